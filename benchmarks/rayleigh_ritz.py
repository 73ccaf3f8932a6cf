"""Does the randomized refresh lose accuracy by taking its Rayleigh-Ritz step from the squared Gram?

``core.projector``'s range finder forms ``z^T z`` (fp32 products, all-reduced over row shards) and
takes its eigenvectors in fp64. Squaring doubles the dynamic range, so directions whose singular
value is below ``sqrt(eps_fp32) ~ 3e-4`` of the largest could, in principle, be resolved worse than
by an SVD of the sketch itself. For matrices with power-law (``1/i``, ``1/i^2``) and exponential
spectra, this compares the library's basis with one whose Rayleigh-Ritz step is an fp64 SVD of
the same sketch (same seeded Gaussian start, same iterations):
- ``energy_ratio - 1``: gradient energy captured by the library's basis over the SVD variant's;
- ``sin_angle``: the largest principal-angle sine between the two rank-``r`` subspaces;
- ``energy_vs_optimal``: the library's captured energy over the top-``r`` singular values'.

    python benchmarks/rayleigh_ritz.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, markdown_table, write_json  # noqa: E402

from distopt.core import projector  # noqa: E402
from distopt.core.linalg import seeded_gaussian  # noqa: E402
from distopt.core.shard import MatrixShardView  # noqa: E402

SEED, OVERSAMPLE, POWER_ITERS = 3, 16, 1


def spectrum_matrix(m: int, n: int, decay: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    i = torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    s = {"power1": i**-1.0, "power2": i**-2.0, "exp20": torch.exp(-i / 20)}[decay]
    return (u * s) @ v.T


def svd_ritz_basis(g: torch.Tensor, side: str, r: int) -> torch.Tensor:
    """The range finder of ``core.projector`` (no previous basis) with an fp64 SVD of the sketch."""
    m, n = g.shape
    omega = seeded_gaussian((n, r + OVERSAMPLE), SEED, "cpu")
    if side == "right":
        x = omega
        for _ in range(POWER_ITERS + 1):
            y, _ = torch.linalg.qr(g @ x)
            x, _ = torch.linalg.qr(g.T @ y)
        _, _, vh = torch.linalg.svd((g @ x).double(), full_matrices=False)
        return x.double() @ vh[:r].T
    y, _ = torch.linalg.qr(g @ omega)
    for _ in range(POWER_ITERS):
        x, _ = torch.linalg.qr(g.T @ y)
        y, _ = torch.linalg.qr(g @ x)
    u, _, _ = torch.linalg.svd((g.T @ y).double().T, full_matrices=False)
    return y.double() @ u[:, :r]


def energy(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return (g @ basis if side == "right" else basis.T @ g).square().sum().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/rayleigh_ritz.json")
    args = parser.parse_args(argv)
    rows = []
    for m, n in [(512, 1024), (1024, 512), (2048, 512)]:
        side = "right" if m >= n else "left"
        for decay in ("power1", "power2", "exp20"):
            exact = spectrum_matrix(m, n, decay, m + n)
            g = exact.float()
            top = torch.linalg.svdvals(exact)
            for r in (16, 64):
                ours = projector.randomized_basis(g, MatrixShardView("w", (m, n)), side, r, oversample=OVERSAMPLE,
                                                  power_iters=POWER_ITERS, seed=SEED).double()
                theirs = svd_ritz_basis(g, side, r)
                cosines = torch.linalg.svdvals(torch.linalg.qr(ours)[0].T @ torch.linalg.qr(theirs)[0])
                rows.append({
                    "shape": f"{m}x{n}", "side": side, "decay": decay, "rank": r,
                    "energy_ratio_minus_1": energy(exact, ours, side) / energy(exact, theirs, side) - 1,
                    "sin_angle": (1 - cosines.min() ** 2).clamp_min(0).sqrt().item(),
                    "energy_vs_optimal": energy(exact, ours, side) / (top[:r] ** 2).sum().item(),
                })
    path = write_json(args.out, {"benchmark": "rayleigh_ritz", "env": environment("cpu"), "results": rows})
    print(markdown_table(rows, [("shape", "shape", "s"), ("side", "side", "s"), ("decay", "spectrum", "s"),
                                ("rank", "r", "d"), ("energy_ratio_minus_1", "energy / SVD-RR - 1", "+.1e"),
                                ("sin_angle", "max sin angle", ".1e"), ("energy_vs_optimal", "energy / optimal", ".6f")]))
    print(f"\nJSON: {path}")
    return rows


if __name__ == "__main__":
    main()
