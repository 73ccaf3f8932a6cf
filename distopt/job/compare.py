"""``distopt compare``: several optimizers on the same model, data and token budget.

Each optimizer runs as its own training job (a subprocess: ``python -m distopt.job.train``, or
``torchrun`` with ``--nproc`` ranks), so peak memory and step time are measured in isolation and
one failing optimizer does not take the others down. Every run reads the same run config and
overrides; only ``optim`` changes. The results land in ``<out_dir>/``: one folder per optimizer,
``compare.md`` (the table) and ``compare.png`` (all loss curves on one plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distopt.job.config import REPO_ROOT, ConfigError, OptimConfig, load_config, parse_overrides
from distopt.job.dist import discover, free_port
from distopt.job.memory_cli import parse_optimizer_specs
from distopt.job.metrics import human_bytes, human_count, plot_runs, write_json_atomic
from distopt.job.train import preflight

OPTIM_KEYS = {f.name for f in dataclasses.fields(OptimConfig)} - {"name", "hparams"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distopt compare",
        description="Train the same model on the same data and token budget with several optimizers; write one "
                    "loss plot and a markdown table (final validation loss, state bytes per parameter, step time, "
                    "peak memory). Other arguments are run-config overrides applied to every run (--train.steps 200).",
    )
    p.add_argument("--config", "-c", default=None, help="run config (path or name under configs/runs/)")
    p.add_argument("--optimizers", nargs="+", required=True,
                   help="e.g. adamw galore:rank=16,update_proj_gap=50 (lr, weight_decay, ... set optim.<key>; "
                        "other keys are the algorithm's hyper-parameters)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun --nproc_per_node; default 1)")
    p.add_argument("--out_dir", "--out-dir", default=None, help="default: runs/compare-<config name>")
    p.add_argument("--timeout", type=float, default=0, help="seconds allowed per run (0: no limit)")
    return p


def _run_overrides(base_name: str, label: str, name: str, hparams: dict, run_dir: Path) -> list[tuple[str, str]]:
    pairs = [("optim.name", name), ("out_dir", str(run_dir)), ("run_name", label), ("overwrite", "true"),
             ("log.progress", "lines")]
    if name != base_name:  # the base config's algorithm-specific hyper-parameters belong to its optimizer
        pairs.append(("optim.hparams", "{}"))
    for key, value in hparams.items():
        pairs.append((f"optim.{key}" if key in OPTIM_KEYS else f"optim.hparams.{key}", json.dumps(value) if not isinstance(value, str) else value))
    return pairs


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        specs = parse_optimizer_specs(args.optimizers)
        base_pairs = parse_overrides(extra)
        base = load_config(args.config, base_pairs)
        root = Path(args.out_dir or Path("runs") / f"compare-{Path(args.config or 'default').stem}")
        if args.nproc < 1:
            raise ConfigError(f"--nproc={args.nproc}: must be >= 1")
        plans = []
        info = discover()
        info.world_size = args.nproc
        for label, name, hparams in specs:
            run_dir = root / _slug(label)
            pairs = base_pairs + _run_overrides(base.optim.name, label, name, hparams, run_dir)
            cfg = load_config(args.config, pairs)
            if cfg.engine.name == "single" and args.nproc > 1:
                raise ConfigError("engine.name=single with --nproc > 1; use engine.name=ddp or auto")
            preflight(cfg, info)  # every run's config and hyper-parameters are checked before the first starts
            plans.append((label, cfg, pairs, run_dir))
    except ConfigError as err:
        print(f"distopt compare: {err}", file=sys.stderr)
        return 2

    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results: list[dict[str, Any]] = []
    for label, _cfg, pairs, run_dir in plans:
        cmd = [sys.executable]
        if args.nproc > 1:
            cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", str(free_port())]
        cmd += ["-m", "distopt.job.train"] + (["--config", args.config] if args.config else [])
        cmd += [f"{k}={v}" for k, v in pairs]
        print(f"\n=== {label}: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        code: int | str  # the exit status, or "timeout"
        try:
            code = subprocess.run(cmd, env=env, timeout=args.timeout or None).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if code == 0 and summary_path.is_file() else None
        results.append({"label": label, "exit": code, "wall_s": time.perf_counter() - started, "summary": summary, "dir": str(run_dir)})

    ok = {r["label"]: Path(r["dir"]) / "metrics.jsonl" for r in results if r["summary"]}
    png = plot_runs(ok, root / "compare.png", f"{plans[0][1].model.name}: {len(ok)} optimizers, same data and tokens") if ok else None
    table = render_table(results, plans[0][1], args.nproc, png)
    (root / "compare.md").write_text(table)
    write_json_atomic(root / "compare.json", results)
    print("\n" + table)
    return 0 if all(r["summary"] for r in results) else 1


def render_table(results: list[dict], cfg, nproc: int, png) -> str:
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * nproc * cfg.data.seq_len
    lines = [
        f"# Optimizer comparison: {cfg.model.name}",
        "",
        f"Same model, data ({cfg.data.source}) and budget: {cfg.train.steps} steps x "
        f"{cfg.train.batch_size * cfg.train.grad_accum * nproc} sequences x {cfg.data.seq_len} tokens = "
        f"{human_count(tokens)} tokens, {nproc} rank(s).",
        "",
        "| optimizer | final val loss | best val loss | final train loss | state bytes | state bytes / param | step time (ms) | tokens/s | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["summary"]
        if not s:
            lines.append(f"| {r['label']} | failed (exit {r['exit']}) | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {s['final_val_loss']:.4f} | {s['best_val_loss']:.4f} | {s['final_train_loss']:.4f} | "
            f"{human_bytes(s['state_bytes'])} | {s['state_bytes_per_param']:.2f} | {1000 * s['step_time_s']:.0f} | "
            f"{human_count(s['tokens_per_s'])} | {human_bytes(s['peak_mem_bytes'])} |"
        )
    lines += [
        "",
        "State bytes are rank 0's optimizer state (distopt.state_bytes, projection matrices included); step time is "
        "the median over the run; peak memory is "
        + ("the CUDA allocator's peak." if cfg.engine.device == "cuda" else "the process's peak resident set (CPU) or the CUDA allocator's peak (GPU)."),
        f"Loss curves: {png}" if png else "Loss curves: no PNG (matplotlib missing); see each run's metrics.jsonl.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
