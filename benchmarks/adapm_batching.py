"""AdaPM's and AdaPM-mini's step with the low-rank refits batched by shape against one by one, on
LLaMA shapes with fixed random gradients (plain steps: the gap keeps reseeds out). Median of 7
steps after 3 untimed ones; prints one line per row and writes JSON.

    python benchmarks/adapm_batching.py --shapes narrow32,small,60m [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import environment  # noqa: E402
from step_time import SHAPES  # noqa: E402

import distopt  # noqa: E402
from distopt.models import TinyLlama  # noqa: E402
from distopt.optim.adapm import AdaPM  # noqa: E402


def median_step_ms(name: str, shape, device: str, batched: bool, steps: int = 7) -> float:
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyLlama(shape)
    opt = distopt.build_optimizer(model, name, update_proj_gap=10**6)
    g = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    real = AdaPM._batch_key
    if not batched:
        AdaPM._batch_key = lambda self, p, group, done: None
    try:
        for _ in range(3):
            opt.step()
        times = []
        for _ in range(steps):
            if device == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - tic))
    finally:
        AdaPM._batch_key = real
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="narrow32,small,60m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "adapm_batching.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        for name in ("adapm-mini", "adapm"):
            row = {"shape": shape, "optimizer": name}
            for mode in ("one_by_one", "batched"):
                row[f"{mode}_ms"] = round(median_step_ms(name, SHAPES[shape], args.device, mode == "batched"), 2)
            row["batched_x"] = round(row["batched_ms"] / row["one_by_one_ms"], 3)
            rows.append(row)
            print(f"{shape:9s} {name:11s} one by one {row['one_by_one_ms']:9.2f} ms  batched {row['batched_ms']:9.2f} ms"
                  f"  ({row['batched_x']:.2f}x)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": environment(args.device), "threads": args.threads, "rows": rows}, indent=1))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
