"""Time the orthonormalization of tall-skinny blocks at AdaPM's LLaMA-1B factor shapes: Householder QR
(``torch.linalg.qr``) one by one and batched, against shifted Cholesky-QR2 in fp64
(``distopt.core.linalg.orthonormalize_rows_gram``: Gram, Cholesky, triangular solve, twice). Then
the pieces of one randomized GaLore refresh at LLaMA-1B, rank 512 (k = 528 columns): the Gaussian
sketch drawn on the CPU and copied, drawn by torch's device generator, and drawn by the counter
draw the optimizers use on a device (``linalg.counter_gaussian``), the QRs of the range finder's blocks, and the ``k x k`` Rayleigh-Ritz
eigenproblem in fp64 and fp32. Prints JSON.

    python benchmarks/orth_timing.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SHAPES = {"attention q/k (2048 x 2048, r=51)": (2048, 51), "MLP (5461 x 2048, r=74)": (5461, 74),
          "MLP transposed (2048 x 5461, r=74)": (2048, 74)}


def timed(fn, device, reps):
    """ms per call of ``fn`` over ``reps`` calls, after one untimed call."""
    fn()
    return common.timed(lambda: [fn() for _ in range(reps)], device) / reps


def cholesky_qr2(x):
    """The shifted fp64 Cholesky-QR2 that AdaPM's factor refit uses."""
    from distopt.core.linalg import orthonormalize_rows_gram

    return orthonormalize_rows_gram(x)


def refresh_pieces(device: str, reps: int, k: int = 528) -> dict:
    """ms per call of each piece of a randomized refresh of one LLaMA-1B matrix at rank 512."""
    from distopt.core.linalg import counter_gaussian

    gram = torch.randn(k, 4 * k, device=device)
    gram = gram @ gram.T
    cpu = torch.Generator().manual_seed(1)
    rows = {
        "gaussian_cpu_2048x528_to_device": timed(lambda: torch.randn((2048, k), generator=cpu).to(device), device, reps),
        "gaussian_device_2048x528": timed(lambda: torch.randn(2048, k, device=device), device, reps),
        "gaussian_counter_2048x528": timed(lambda: counter_gaussian((2048, k), 1, device), device, reps),
        "eigh_fp64_528": timed(lambda: torch.linalg.eigh(gram.double()), device, reps),
        "eigh_fp32_528": timed(lambda: torch.linalg.eigh(gram), device, reps),
    }
    for d in (5461, 2048):
        block = torch.randn(d, k, device=device)
        rows[f"qr_{d}x{k}"] = timed(lambda block=block: torch.linalg.qr(block), device, reps)
        rows[f"cholesky_qr2_{d}x{k}"] = timed(lambda block=block: cholesky_qr2(block), device, reps)
    for d, n in ((5461, 2048), (2048, 2048)):
        g = torch.randn(d, n, device=device)
        x = torch.randn(n, k, device=device)
        rows[f"sketch_gemm_{d}x{n}x{k}"] = timed(lambda g=g, x=x: g @ x, device, reps)
    return {key: round(value, 3) for key, value in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=24, help="matrices of one shape (layers)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "rows": []}
    for label, (d, r) in SHAPES.items():
        xs = torch.randn(args.batch, d, r, device=args.device)
        row = {"shape": label, "batch": args.batch,
               "qr_one_by_one_ms": timed(lambda xs=xs: [torch.linalg.qr(x) for x in xs], args.device, args.reps),
               "qr_batched_ms": timed(lambda xs=xs: torch.linalg.qr(xs), args.device, args.reps),
               "cholesky_qr2_one_by_one_ms": timed(lambda xs=xs: [cholesky_qr2(x) for x in xs], args.device, args.reps),
               "cholesky_qr2_batched_ms": timed(lambda xs=xs: cholesky_qr2(xs), args.device, args.reps)}
        q = cholesky_qr2(xs[0].double()).float()
        row["cholesky_qr2_orthogonality"] = (q.mT @ q - torch.eye(r, device=args.device)).abs().max().item()
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["refresh_pieces"] = refresh_pieces(args.device, args.reps)
    print(json.dumps(out["refresh_pieces"]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
