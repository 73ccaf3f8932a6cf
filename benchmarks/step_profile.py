"""Where an optimizer step's time goes: a ``torch.profiler`` trace of a few plain steps on LLaMA-1B
shapes with fixed random gradients (the GPU suite's step setting), as tables of the top operators
and kernels by self time, and the host synchronizations per step.

    python benchmarks/step_profile.py --optimizer galore                 # CUDA when available
    python benchmarks/step_profile.py --optimizer adapm-mini --steps 3
    python benchmarks/step_profile.py --optimizer "galore[projection_precision=tf32]" --device cpu --tiny

Writes ``runs/step_profile/<label>.json`` (``$OUT`` if set) with the tables, and a Chrome trace beside
it with ``--trace``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import timed  # noqa: E402
from suite.base import make_optimizer  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "aten::item")


def build(label: str, device: str, tiny: bool, rank: int):
    """The model and the optimizer of a GPU-suite row label (``adamw-fused``, ``galore``,
    ``galore[projection_precision=tf32]``, ``adapm-mini``, ...), built as the suite builds them."""
    from distopt.models import LlamaShape, TinyLlama

    if tiny:
        shape = LlamaShape(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128)
        rank = min(rank, 8)
    else:
        shape = LlamaShape(vocab_size=32000, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
                           num_attention_heads=32, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyLlama(shape)
    # A gap of 10^6: plain steps only (the first step's refresh is not profiled).
    optimizer, _, _ = make_optimizer(label, model, shape, rank=rank, gap=10**6, lr=1e-3)
    return model, optimizer


def table(events, key: str, limit: int) -> list[dict]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:limit]
    return [{"name": e.key[:90], "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 3)} for e in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="galore", help="a GPU-suite row label")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", action="store_true")
    args = p.parse_args(argv)
    dev = args.device
    model, opt = build(args.optimizer, dev, args.tiny, args.rank)
    g = torch.Generator(device=dev).manual_seed(1)
    for q in model.parameters():
        q.grad = torch.randn(q.shape, device=dev, generator=g) * 1e-3
    for _ in range(2):  # state allocation and the first refresh stay out of the profile
        opt.step()
    step_ms = timed(lambda: [opt.step() for _ in range(args.steps)], dev) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    out = {"optimizer": args.optimizer, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "shape": "tiny" if args.tiny else "llama-1b", "steps": args.steps,
           "step_ms_unprofiled": round(step_ms, 2),
           "syncs_per_step": {e.key: e.count / args.steps for e in events if e.key in SYNC_EVENTS},
           "cpu_ops": table(events, "self_cpu_time_total", args.top)}
    if dev == "cuda":
        out["kernels"] = table([e for e in events if getattr(e, device_key) > 0], device_key, args.top)
        out["device_ms_per_step"] = round(sum(getattr(e, device_key) for e in events) / 1e3 / args.steps, 2)
    target = Path(os.environ.get("OUT") or ROOT / "runs" / "step_profile")
    target.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in args.optimizer)
    (target / f"{stem}.json").write_text(json.dumps(out, indent=1))
    if args.trace:
        prof.export_chrome_trace(str(target / f"{stem}.trace.json"))
    print(f"{args.optimizer}: {step_ms:.2f} ms/step unprofiled; host syncs per step: {out['syncs_per_step']}")
    for title, key in (("CPU ops (self)", "cpu_ops"), ("kernels (self, device)", "kernels")):
        if key in out:
            print(f"\n{title}:")
            for row in out[key]:
                print(f"  {row['self_ms']:10.3f} ms  {row['calls']:6d}  {row['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
