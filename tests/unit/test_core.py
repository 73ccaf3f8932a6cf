"""The subspace engine: bases, refresh schedule, moment policies, routing."""

import math

import pytest
import torch

from distopt.core import linalg, moments, projector, routing, schedule
from distopt.core.shard import MatrixShardView


def decaying_matrix(m, n, seed=0, decay=0.85):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u[:, :k] * s) @ v[:, :k].T


def optimal_energy(g, r):
    s = torch.linalg.svdvals(g)
    return float((s[:r] ** 2).sum() / (s**2).sum())


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
@pytest.mark.parametrize("method", ["svd", "randomized", "random"])
def test_bases_are_orthonormal(shape, method):
    g = torch.randn(*shape)
    view = MatrixShardView("w", shape)
    side = projector.resolve_side("auto", shape)
    r = 12
    if method == "svd":
        basis = projector.svd_basis(g, view, side, r)
    elif method == "random":
        basis = projector.random_basis(view, side, r, seed=3, device="cpu")
    else:
        basis = projector.randomized_basis(g, view, side, r, oversample=8, power_iters=1, seed=3)
    assert basis.shape == (projector.side_dim(side, shape), r)
    torch.testing.assert_close(basis.T @ basis, torch.eye(r), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(128, 64), (64, 160)])
def test_randomized_refresh_captures_optimal_energy(shape):
    g = decaying_matrix(*shape)
    r = 16
    view = MatrixShardView("w", shape)
    side = projector.resolve_side("auto", shape)
    basis = projector.randomized_basis(g, view, side, r, oversample=16, power_iters=1, seed=7)
    captured = linalg.energy_fraction(g, basis, side)
    assert captured >= 0.95 * optimal_energy(g, r)


def test_randomized_refresh_warm_start_tracks_svd():
    g = decaying_matrix(80, 50, decay=0.7)
    view = MatrixShardView("w", (80, 50))
    exact = projector.svd_basis(g, view, "right", 8)
    warm = projector.randomized_basis(g + 1e-3 * torch.randn(80, 50), view, "right", 8,
                                      oversample=4, power_iters=1, seed=1, previous=exact)
    # Same subspace, and signs aligned with the previous basis column by column.
    assert (torch.diagonal(warm.T @ exact) > 0.99).all()


def test_random_basis_is_seeded_and_ignores_rank_layout():
    view = MatrixShardView("w", (50, 30))
    a = projector.random_basis(view, "left", 5, seed=11, device="cpu")
    b = projector.random_basis(view, "left", 5, seed=11, device="cpu")
    c = projector.random_basis(view, "left", 5, seed=12, device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A rank holding rows [20, 35) sees exactly those rows of the same basis.
    shard = MatrixShardView("w", (50, 30), row_start=20, row_end=35)
    assert torch.equal(projector.random_basis(shard, "left", 5, seed=11, device="cpu"), a[20:35])


def test_gram_orthonormalization_is_the_positive_diagonal_qr_on_a_full_rank_block():
    # cond ~ 1e7: one Cholesky-QR pass (even in fp64) is off by ~1e-2; two are orthonormal.
    x = decaying_matrix(300, 40, decay=0.66)[:, :40] + 1e-7 * torch.randn(300, 40, generator=torch.Generator().manual_seed(1))
    q = linalg.orthonormalize_rows_gram(x)
    batch = linalg.orthonormalize_rows_gram(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batch, torch.stack([q, q]), atol=1e-6, rtol=0)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.T @ q, torch.eye(40), atol=1e-5, rtol=0)
    reference = linalg._positive_diagonal(*torch.linalg.qr(x.double()))[0].float()  # fp32 QR is off by cond * 6e-8
    torch.testing.assert_close(q, reference, atol=1e-5, rtol=0)


def test_gram_orthonormalization_of_a_rank_deficient_block_is_finite_and_never_amplifies():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g) @ torch.randn(6, 16, generator=g)  # rank 6 of 16 columns, plus rounding
    x = torch.cat([x, torch.zeros(200, 3)], dim=1)  # and 3 exactly zero columns
    q = linalg.orthonormalize_rows_gram(x)
    assert torch.isfinite(q).all()
    assert torch.linalg.eigvalsh((q.T @ q).double()).max() <= 1 + 1e-6
    assert torch.equal(q[:, 16:], torch.zeros(200, 3))
    torch.testing.assert_close(q @ (q.T @ x), x, atol=1e-4, rtol=1e-4)  # its span holds x
    assert torch.equal(linalg.orthonormalize_rows_gram(torch.zeros(50, 4)), torch.zeros(50, 4))


def test_stable_seed_is_process_independent():
    assert linalg.stable_seed("layer.0.q", 3) == linalg.stable_seed("layer.0.q", 3)
    assert linalg.stable_seed("layer.0.q", 3) != linalg.stable_seed("layer.0.q", 4)
    # Pinned: a salted hash() would change this between processes.
    assert linalg.stable_seed("distopt") == 734768375544503739


def test_schedule_unstaggered_is_galore_rule():
    hits = [t for t in range(25) if schedule.is_refresh_step(t, 10, schedule.refresh_phase("x", 10, False))]
    assert hits == [0, 10, 20]


def test_stagger_spreads_refreshes():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(64)]
    gap = 50
    phases = [schedule.refresh_phase(n, gap, True) for n in names]
    per_step = [sum(schedule.is_refresh_step(t, gap, p) for p in phases) for t in range(1, 3 * gap)]
    assert max(per_step) <= 8  # 64 matrices over 50 steps, never all at once
    assert len(set(phases)) > 30


@pytest.mark.parametrize("phase", [0, 3, 9])
def test_refresh_index_counts_refreshes(phase):
    gap = 10
    count = 0
    for t in range(60):
        assert schedule.refresh_index(t, gap, phase) == count
        count += schedule.is_refresh_step(t, gap, phase)


def test_moment_policies():
    old = torch.linalg.qr(torch.randn(30, 4))[0]
    new = torch.linalg.qr(torch.randn(30, 4))[0]
    c = projector.change_of_basis(new, old, "left", None)
    m = torch.randn(4, 7)
    v = m.square() + torch.rand(4, 7)
    m1, v1 = m.clone(), v.clone()
    moments.apply_moment_policy("rotate", "left", c, m1, v1)
    torch.testing.assert_close(m1, c @ m)
    assert torch.equal(v1, v)
    m2, v2 = m.clone(), v.clone()
    moments.apply_moment_policy("transform", "left", c, m2, v2, step=3, betas=(0.9, 0.999))
    torch.testing.assert_close(m2, c @ m)  # the transform's properties: tests/unit/test_moments.py
    m3, v3 = m.clone(), v.clone()
    moments.apply_moment_policy("reset", "left", c, m3, v3)
    assert not m3.any() and not v3.any()
    # Right side: coordinates are columns, M -> M C^T.
    mr = torch.randn(7, 4)
    moments.apply_moment_policy("rotate", "right", c, mr2 := mr.clone(), None)
    torch.testing.assert_close(mr2, mr @ c.T)
    with pytest.raises(ValueError, match="moment_policy"):
        moments.check_policy("spin")


def test_rotation_preserves_the_back_projected_moment_when_subspace_is_kept():
    # Same subspace, different basis: rotating keeps back(M) unchanged.
    old = torch.linalg.qr(torch.randn(20, 5))[0]
    q = torch.linalg.qr(torch.randn(5, 5))[0]
    new = old @ q
    m = torch.randn(9, 5)
    c = projector.change_of_basis(new, old, "right", None)
    moved = m.clone()
    moments.apply_moment_policy("rotate", "right", c, moved, None)
    torch.testing.assert_close(projector.project_back(moved, new, "right"), projector.project_back(m, old, "right"))


def test_default_routing():
    names = [
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.0.mlp.c_fc.bias", "transformer.wte.weight", "transformer.ln_f.weight",
    ]
    roles = routing.assign_roles(names)
    assert [roles[n] for n in names] == [
        "embedding", "q", "k", "v", "o", "mlp_in", "mlp_in", "mlp_out", "norm", "norm", "lm_head",
        "qkv", "o", "mlp_out", "bias", "embedding", "norm",
    ]


def test_user_rules_first_match_wins_and_unmatched_rule_raises():
    names = ["a.q_proj.weight", "a.k_proj.weight"]
    roles = routing.assign_roles(names, rules=[(r"k_proj", "other"), (r"proj", "matrix")])
    assert roles == {"a.q_proj.weight": "matrix", "a.k_proj.weight": "other"}
    with pytest.raises(ValueError, match="matched no parameter"):
        routing.assign_roles(names, rules=[(r"qproj", "other")])
    with pytest.raises(ValueError, match="role must be one of"):
        routing.assign_roles(names, rules=[(r"q_proj", "attention")])
    with pytest.raises(ValueError, match="not a valid regex"):
        routing.assign_roles(names, rules=[(r"(q", "other")])


def test_view_validation():
    with pytest.raises(ValueError, match="2-D"):
        MatrixShardView("w", (10,))
    with pytest.raises(ValueError, match="outside"):
        MatrixShardView("w", (10, 4), row_start=5, row_end=12)
    assert MatrixShardView("w", (10, 4)).local_rows == 10
    assert math.isclose(linalg.energy_fraction(torch.eye(4), torch.eye(4)[:, :2], "right"), 0.5, rel_tol=1e-6)
