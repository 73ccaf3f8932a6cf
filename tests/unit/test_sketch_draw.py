"""The seeded Gaussian draws behind sketches and random bases: the counter-based draw used on devices
(exact integer hashing, so every device and GPU model gives the same numbers) and the dispatch."""

import math

import pytest
import torch

from distopt.core import linalg

MASK = 0xFFFFFFFF


def mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x27D4EB2F) & MASK
    return x ^ (x >> 16)


def reference(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The draw element by element in Python integers and fp64 math."""
    numel = math.prod(shape)
    half = (numel + 1) // 2
    first = mix(mix((seed & MASK) ^ 0x5BD1E995) ^ ((seed >> 32) & MASK))
    second = mix(first ^ 0x3C6EF372)

    def bits(counter: int) -> int:
        return mix(mix(counter ^ first) ^ second)

    cosines, sines = [], []
    for j in range(half):
        radius = math.sqrt(-2.0 * math.log((bits(j) + 1.0) * 2.0**-32))
        angle = bits(half + j) * 2.0 * math.pi * 2.0**-32
        cosines.append(radius * math.cos(angle))
        sines.append(radius * math.sin(angle))
    return torch.tensor((cosines + sines)[:numel], dtype=torch.float64).float().view(shape)


@pytest.mark.parametrize("shape,seed", [((5, 3), 0), ((4, 4), 12345), ((7,), 2**62 + 977), ((3, 2, 5), 2**32)])
def test_the_counter_draw_is_its_hash_element_by_element(shape, seed):
    drawn = linalg.counter_gaussian(shape, seed)
    assert drawn.dtype == torch.float32 and drawn.shape == shape
    torch.testing.assert_close(drawn, reference(shape, seed), rtol=1e-6, atol=1e-6)


def test_the_counter_draw_is_standard_normal():
    z = linalg.counter_gaussian((400_000,), linalg.stable_seed(0, "layers.0.q_proj", 1, "range")).double()
    assert abs(z.mean().item()) < 0.006
    assert abs(z.var().item() - 1.0) < 0.01
    assert abs(z.pow(4).mean().item() - 3.0) < 0.05  # kurtosis of a normal
    # Kolmogorov-Smirnov distance to the normal CDF (about 0.002 for a true normal sample this size).
    sorted_z = z.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    empirical = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    assert (cdf - empirical).abs().max().item() < 0.005


def test_draws_of_nearby_seeds_and_neighbouring_entries_are_uncorrelated():
    base = linalg.counter_gaussian((200_000,), 7)
    for other in (8, 7 + 2**32, 7 ^ 1 << 40):
        assert abs(torch.corrcoef(torch.stack([base, linalg.counter_gaussian((200_000,), other)]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([base[:-1], base[1:]]))[0, 1]) < 0.01
    half = base.numel() // 2  # the cosine and sine halves share their radii, not their angles
    assert abs(torch.corrcoef(torch.stack([base[:half], base[half:]]))[0, 1]) < 0.01


def test_small_seeds_draw_no_outliers_in_their_first_entries():
    # A seed used raw as the key puts the mixer's fixed point (u = 2**-32, |z| = 6.66) at counter = seed.
    first = torch.stack([linalg.counter_gaussian((64,), seed) for seed in range(64)])
    radii = torch.hypot(first[:, :32], first[:, 32:])  # each pair's Box-Muller radius, whatever its angle
    assert radii.max().item() < 5.5


def test_a_counter_sketch_is_as_well_conditioned_as_a_gaussian_one():
    sketch = linalg.counter_gaussian((4096, 64), 3)
    singular = torch.linalg.svdvals(sketch.double() / math.sqrt(4096))
    # Marchenko-Pastur edges for 64/4096: 1 -+ 0.125.
    assert 0.85 < singular.min().item() and singular.max().item() < 1.15


def test_an_empty_or_odd_draw_has_its_shape():
    assert linalg.counter_gaussian((9, 0), 1).shape == (9, 0)
    assert linalg.counter_gaussian((3, 3), 1).isfinite().all()


def test_sketches_on_a_device_are_drawn_there_and_on_a_cpu_by_the_cpu_generator(monkeypatch):
    expected = torch.randn((6, 4), generator=torch.Generator().manual_seed(11))
    assert torch.equal(linalg.seeded_gaussian((6, 4), 11, "cpu"), expected)  # CPU numbers unchanged

    calls = []

    def counted(shape, seed, device):
        calls.append(torch.device(device).type)
        return torch.zeros(shape, device=device)

    monkeypatch.setattr(linalg, "counter_gaussian", counted)
    drawn = linalg.seeded_gaussian((6, 4), 11, "meta")  # any device but the CPU
    assert calls == ["meta"] and drawn.device.type == "meta"
    monkeypatch.setattr(linalg, "CPU_SKETCHES", True)  # the switch: drawn on the CPU and copied
    assert linalg.seeded_gaussian((6, 4), 11, "meta").device.type == "meta" and calls == ["meta"]
