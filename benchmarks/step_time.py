"""Optimizer step time and state bytes on LLaMA-shaped parameters, all optimizers in one run.

Each optimizer steps the same model with fixed random gradients for one first step (every
matrix takes its initial basis there) and then a full refresh cycle of ``--gap`` steps, so the
cycle contains each matrix's refresh exactly once (staggered or not). Reported per optimizer:
the cycle's mean (amortized) and median step, its worst single step, the first step, and
``distopt.state_bytes``. Ratios are against torch fused AdamW measured in the same process.

    python benchmarks/step_time.py                       # CPU, small LLaMA shapes
    python benchmarks/step_time.py --device cuda --shapes 1b --rank 512 --gap 200
    python benchmarks/step_time.py --shapes narrow32 --rank 16 --threads 1   # bound by dispatch, not flops

Also per optimizer: the median of steps with no refresh at all ("plain"), and the aten ops one such
step dispatches (a ``TorchDispatchMode`` count; a ``torch._foreach_*`` call over a list is one op).
With ``--interleave`` the plain steps of all optimizers run in turn and each "plain x fused AdamW"
is the median of the rounds' ratios, which a machine that speeds up and slows down skews far less.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py --shapes narrow32 --rank 16 --gap 50 --threads 1 \
        --plain-steps 200 --interleave --optimizers adamw-fused,galore

``--profile STEPS`` adds, per optimizer, the top ops of a plain step by self time (torch profiler).
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PACKED, OpCounter, environment, markdown_table, packed_as_asked, summarize, timed, write_json  # noqa: E402

import distopt  # noqa: E402
from distopt.models import LLAMA_1B, LlamaShape, TinyLlama  # noqa: E402

SHAPES = {
    "small": LlamaShape(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "60m": LlamaShape(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "1b": LLAMA_1B,
    # 224 small matrices: a step bound by launches and Python, as a 7B model's shards are on 64 ranks
    "narrow32": LlamaShape(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=32, num_attention_heads=4),
    # narrow32's 224 matrices at width 8 (use --rank 2): kernels cost next to nothing, so a step's time
    # is its Python and dispatch
    "tiny32": LlamaShape(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=32, num_attention_heads=2),
}
CHOICES = ("adamw-foreach", "adamw-fused", "galore-torch", "galore", "galore-svd", "galore-compile", "galore-bf16", "snsm",
           "adam-mini", "grassjump", "subtrack", "rso", "sam", "adapm", "adapm-mini")
# distopt optimizers built by their own name (the rest of the galore-* choices are galore variants)
OWN_NAMES = ("snsm", "grassjump", "subtrack", "rso", "sam", "adapm", "adapm-mini")
# distopt's galore with other settings, by choice name
VARIANTS = {"galore-svd": {"refresh": "svd", "stagger": False}, "galore-compile": {"compile": True},
            "galore-bf16": {"projection_precision": "bf16"}}


def build(choice: str, model: torch.nn.Module, args) -> torch.optim.Optimizer | None:
    lr = 1e-3
    choice = packed_as_asked(choice, model)
    if choice.startswith("adamw"):
        fused = choice == "adamw-fused"
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused)
    if choice == "galore-torch":
        try:
            from galore_torch import GaLoreAdamW
        except ImportError:
            print("galore-torch is not installed (pip install galore-torch); skipping it", file=sys.stderr)
            return None
        split = distopt.build_optimizer(model, "galore", rank=args.rank)  # routing only
        groups = [{"params": g["params"]} if g["kind"] == "adamw" else
                  {"params": g["params"], "rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25, "proj_type": "std"}
                  for g in split.param_groups]
        del split
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return GaLoreAdamW(groups, lr=lr)
    if choice == "adam-mini":
        return distopt.build_optimizer(model, "adam-mini", lr=lr)
    name = choice if choice in OWN_NAMES else "galore"
    return distopt.build_optimizer(model, name, lr=lr, rank=args.rank, update_proj_gap=args.gap, **VARIANTS.get(choice, {}))


def plain_optimizer(choice: str, args) -> torch.optim.Optimizer | None:
    """An optimizer whose refreshes are out of reach after its first step, warmed up (3 steps)."""
    torch.manual_seed(0)
    with torch.device(args.device):
        model = TinyLlama(SHAPES[args.shapes])
    gap = args.gap
    args.gap = 10**9
    try:
        optimizer = build(choice, model, args)
    finally:
        args.gap = gap
    if optimizer is None:
        return None
    generator = torch.Generator(device=args.device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=args.device) * 1e-3
    for _ in range(3):  # the first bases, then warm
        optimizer.step()
    return optimizer


def plain_steps(choice: str, args) -> dict | None:
    """Steps without a refresh (``update_proj_gap`` out of reach after the first step): the median of
    ``--plain-steps`` of them and the aten ops of one, the dispatch-bound measure."""
    optimizer = plain_optimizer(choice, args)
    if optimizer is None:
        return None
    times = [timed(optimizer.step, args.device) for _ in range(args.plain_steps)]
    with OpCounter() as ops:
        optimizer.step()
    return {"plain_median_ms": summarize(times)["median_ms"], "aten_ops_per_plain_step": ops.count}


def plain_steps_interleaved(choices: list[str], args) -> dict[str, dict]:
    """:func:`plain_steps` of every choice at once, one step of each in turn: a machine that slows down
    for a while slows all of them, so the ratio to fused AdamW of each round (their median) stays
    sound where the medians of separate runs do not. Every model lives at once: small shapes only."""
    optimizers = {c: o for c in choices if (o := plain_optimizer(c, args)) is not None}
    times: dict[str, list[float]] = {c: [] for c in optimizers}
    for _ in range(args.plain_steps):
        for choice, optimizer in optimizers.items():
            times[choice].append(timed(optimizer.step, args.device))
    results = {}
    for choice, optimizer in optimizers.items():
        with OpCounter() as ops:
            optimizer.step()
        results[choice] = {"plain_median_ms": summarize(times[choice])["median_ms"], "aten_ops_per_plain_step": ops.count}
        if "adamw-fused" in times:
            rounds = sorted(t / base for t, base in zip(times[choice], times["adamw-fused"]))
            results[choice]["plain_vs_fused_adamw"] = rounds[len(rounds) // 2]
    return results


def profile_plain(choice: str, args, top: int = 10) -> list[dict]:
    """Where a plain step's time goes: torch's profiler over ``--profile`` plain steps, the ``top``
    entries by self time per step (host time on CPU, kernel time on a GPU). The step's own entry
    (``Optimizer.step#...``) is its Python and everything outside the ops."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = plain_optimizer(choice, args)
    if optimizer is None:
        return []
    cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.profile):
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        self_us = (getattr(event, "self_device_time_total", 0) if cuda else event.self_cpu_time_total)
        if self_us > 0:
            rows.append({"op": event.key, "self_ms_per_step": self_us / 1e3 / args.profile,
                         "calls_per_step": event.count / args.profile})
    rows.sort(key=lambda row: -row["self_ms_per_step"])
    return rows[:top]


def measure(choice: str, args) -> dict | None:
    torch.manual_seed(0)
    with torch.device(args.device):
        model = TinyLlama(SHAPES[args.shapes])
    optimizer = build(choice, model, args)
    if optimizer is None:
        return None
    generator = torch.Generator(device=args.device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=args.device) * 1e-3
    first = timed(optimizer.step, args.device)
    cycle = []
    for step in range(args.gap):
        cycle.append(timed(optimizer.step, args.device))
        if args.progress and step % max(1, args.gap // 10) == 0:
            print(f"  {choice}: step {step + 1}/{args.gap}", file=sys.stderr)
    row = {"optimizer": choice, "first_ms": first, **summarize(cycle), "state_bytes": distopt.state_bytes(optimizer),
           "params": sum(p.numel() for p in model.parameters())}
    row["state_bytes_per_param"] = row["state_bytes"] / row["params"]
    if args.device.startswith("cuda"):
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del optimizer, model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def matrices(shapes: str) -> int:
    """How many 2-D weights of the decoder layers the shapes hold (7 per layer)."""
    return 7 * SHAPES[shapes].num_hidden_layers


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: small on cpu, 1b on cuda")
    parser.add_argument("--rank", type=int, default=None, help="default: 64 on cpu, 512 on cuda")
    parser.add_argument("--gap", type=int, default=None, help="update_proj_gap = measured cycle length (default 20 cpu, 200 cuda)")
    parser.add_argument("--optimizers", default=",".join(CHOICES[:5]),
                        help=f"comma list from {CHOICES}; a distopt choice with {PACKED!r} appended runs on a model "
                             "whose same-shape weights distopt.pack_weights laid out in shared buffers")
    parser.add_argument("--out", default="runs/bench/step_time.json")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--plain-steps", type=int, default=20,
                        help="steps without a refresh timed per optimizer (and one counted in aten ops); 0: skip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (the dispatch-bound case: 1)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many plain steps of each optimizer (torch profiler; top ops by self time)")
    parser.add_argument("--interleave", action="store_true",
                        help="plain steps of all optimizers in turn, each ratio the median over rounds (every model "
                             "held at once: small shapes)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.shapes = args.shapes or ("1b" if cuda else "small")
    args.rank = args.rank or (512 if cuda else 64)
    args.gap = args.gap or (200 if cuda else 20)
    choices = [c.strip() for c in args.optimizers.split(",") if c.strip()]
    unknown = {c for c in choices if c.removesuffix(PACKED) not in CHOICES or c == "galore-torch" + PACKED}
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {CHOICES}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False

    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [row for choice in choices if (row := measure(choice, args)) is not None]
    if args.plain_steps and args.interleave:
        plain = plain_steps_interleaved([row["optimizer"] for row in rows], args)
        for row in rows:
            row.update(plain.get(row["optimizer"], {}))
    elif args.plain_steps:
        for row in rows:
            row.update(plain_steps(row["optimizer"], args) or {})
    if args.profile:
        for row in rows:
            row["profile"] = profile_plain(row["optimizer"], args)
    baseline = next((r for r in rows if r["optimizer"] == "adamw-fused"), None)
    for row in rows:
        if baseline:
            row["amortized_vs_fused_adamw"] = row["mean_ms"] / baseline["mean_ms"]
            row["state_vs_adamw"] = row["state_bytes"] / baseline["state_bytes"]
            if "plain_median_ms" in row and "plain_vs_fused_adamw" not in row:
                row["plain_vs_fused_adamw"] = row["plain_median_ms"] / baseline["plain_median_ms"]
        row["max_vs_median"] = row["max_ms"] / row["median_ms"]
    payload = {"benchmark": "step_time", "env": environment(args.device),
               "settings": {"shapes": args.shapes, "rank": args.rank, "gap": args.gap, "lr": 1e-3, "tf32": False,
                            "plain_steps": args.plain_steps, "plain_interleaved": bool(args.interleave),
                            "profiled_steps": args.profile,
                            "matrices": matrices(args.shapes)},
               "results": rows}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("mean_ms", "amortized ms", ".2f"), ("median_ms", "median ms", ".2f"),
        ("max_ms", "worst ms", ".2f"), ("first_ms", "first ms", ".1f"), ("max_vs_median", "worst/median", ".2f"),
        ("amortized_vs_fused_adamw", "x fused AdamW", ".2f"), ("plain_median_ms", "plain ms", ".2f"),
        ("plain_vs_fused_adamw", "plain x fused AdamW", ".2f"), ("aten_ops_per_plain_step", "aten ops/plain step", "d"),
        ("state_bytes_per_param", "state B/param", ".2f"),
        ("state_vs_adamw", "state x AdamW", ".3f"),
    ]))
    for row in rows:
        if row.get("profile"):
            print(f"\n{row['optimizer']}: a plain step's top ops by self time ({args.profile} steps profiled)")
            print(markdown_table(row["profile"], [("op", "op", "s"), ("self_ms_per_step", "ms per step", ".3f"),
                                                  ("calls_per_step", "calls per step", ".1f")]))
    print(f"\n{payload['env']['device_name']} | torch {payload['env']['torch']} | shapes {args.shapes} "
          f"| rank {args.rank} | gap {args.gap} | JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
