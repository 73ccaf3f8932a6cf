"""Time the orthonormalization of tall-skinny blocks at AdaPM's LLaMA-1B factor shapes: Householder
QR (``torch.linalg.qr``) one by one and batched, against Cholesky-QR2 (Gram, Cholesky, triangular
solve, twice). Prints JSON.

    python benchmarks/orth_timing.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {"attention q/k (2048 x 2048, r=51)": (2048, 51), "MLP (5461 x 2048, r=74)": (5461, 74),
          "MLP transposed (2048 x 5461, r=74)": (2048, 74)}


def timed(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def cholesky_qr2(x):
    for _ in range(2):
        r = torch.linalg.cholesky_ex(x.mT @ x, upper=True)[0]
        x = torch.linalg.solve_triangular(r, x, upper=True, left=False)
    return x


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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
