"""Convergence of every optimizer against AdamW on real text, at an equal token budget.

A small LLaMA (``configs/models/llama_tiny.yaml`` by default) is trained on the source code of
Python's standard library (byte tokens; no download) by ``distopt compare``: every optimizer sees
the same data in the same order, the same schedule and the same number of tokens. Learning rates
follow each method's published convention relative to AdamW's (``LR`` below: subspace methods
with scale 0.25 run at 10x AdamW's rate as GaLore does, AdamSNSM's summed second moment also takes
about 10x). Writes ``compare.png`` (all loss curves), ``compare.md`` (final validation loss, state
bytes per parameter, step time, peak memory) and ``compare.json`` under ``--out_dir``, plus
``convergence.json`` with the goal checks: the best optimizer within 1% of AdamW's final validation
loss while holding at most 10% of AdamW's state bytes.

    python benchmarks/convergence.py                   # all optimizers, 400 steps of the tiny model
    python benchmarks/convergence.py --steps 2000 --optimizers adamw galore adapm-mini
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distopt  # noqa: E402
from launch import compare  # noqa: E402

ADAMW_LR = 3e-3
# lr and algorithm settings per optimizer; rank 32 is a quarter of the tiny model's 128-wide side.
SUBSPACE = dict(rank=32, update_proj_gap=50)
RECIPES = {
    "adamw": dict(lr=ADAMW_LR),
    "galore": dict(lr=10 * ADAMW_LR, scale=0.25, **SUBSPACE),
    "golore": dict(lr=10 * ADAMW_LR, scale=0.25, **SUBSPACE),
    "grassjump": dict(lr=10 * ADAMW_LR, scale=0.25, **SUBSPACE),
    "grasswalk": dict(lr=10 * ADAMW_LR, scale=0.25, **SUBSPACE),
    "subtrack": dict(lr=10 * ADAMW_LR, scale=0.25, **SUBSPACE),
    "snsm": dict(lr=10 * ADAMW_LR, **SUBSPACE),
    "sam": dict(lr=ADAMW_LR, update_proj_gap=50),
    "adam-mini": dict(lr=ADAMW_LR),
    "adapm": dict(lr=ADAMW_LR),
    "adapm-mini": dict(lr=ADAMW_LR),
    "rso": dict(lr=10 * ADAMW_LR, **SUBSPACE),
}


def spec(name: str) -> str:
    settings = RECIPES.get(name, dict(lr=ADAMW_LR))
    return name + ":" + ",".join(f"{k}={v}" for k, v in settings.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["adamw"] + [n for n in distopt.list_optimizers() if n != "adamw"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--out_dir", default="runs/convergence")
    parser.add_argument("--check-only", action="store_true", help="only redo the goal check of an earlier run")
    args, extra = parser.parse_known_args(argv)
    if "adamw" not in args.optimizers:
        args.optimizers.insert(0, "adamw")
    code = 0 if args.check_only else compare.main([
        "--config", args.config, "--optimizers", *[spec(n) for n in args.optimizers], "--nproc", str(args.nproc),
        "--out_dir", args.out_dir, f"train.steps={args.steps}", "checkpoint.every=0", *extra,
    ])
    results = json.loads((Path(args.out_dir) / "compare.json").read_text())
    finished = {r["label"].split("(")[0]: r["summary"] for r in results if r["summary"]}
    if "adamw" not in finished:
        print("AdamW did not finish; no goal check", file=sys.stderr)
        return 1

    def val(summary):
        return summary.get("final_val_loss", summary.get("val_loss"))

    base = finished["adamw"]
    checks = []
    for name, summary in finished.items():
        loss_ratio = val(summary) / val(base)
        state_ratio = summary["state_bytes"] / base["state_bytes"]
        checks.append({"optimizer": name, "val_loss": val(summary), "loss_vs_adamw": loss_ratio,
                       "state_vs_adamw": state_ratio, "meets_goal": loss_ratio <= 1.01 and state_ratio <= 0.10})
    Path(args.out_dir, "convergence.json").write_text(json.dumps(checks, indent=2))
    print("\n| optimizer | val loss | x AdamW loss | x AdamW state | within 1% at <= 10% state |\n|---|---|---|---|---|")
    for c in sorted(checks, key=lambda c: c["val_loss"]):
        print(f"| {c['optimizer']} | {c['val_loss']:.4f} | {c['loss_vs_adamw']:.4f} | {c['state_vs_adamw']:.3f} | "
              f"{'yes' if c['meets_goal'] else 'no'} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
