"""The GPU suite's ``step`` section: the optimizer step alone on LLaMA-1B parameters."""

from __future__ import annotations

import dataclasses
import sys

import torch
from common import markdown_table, summarize, timed

import distopt

from .base import Config, allocated_bytes, attempt, free, make_optimizer, new_rows
from .report import brief


def section_step(cfg: Config, labels: list[str]) -> dict:
    from distopt.job.modeling import build_model

    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32_step
    rows = new_rows()
    for label in labels:
        progress: dict = {}

        def one(label=label, progress=progress):
            torch.manual_seed(cfg.seed)
            with torch.device(cfg.device):
                model = build_model(cfg.shape_1b, "native")  # parameters only: HF names, no transformers needed
            generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator, device=cfg.device) * 1e-3
            optimizer, source, _ = make_optimizer(label, model, cfg.shape_1b, rank=cfg.rank, gap=cfg.gap, lr=cfg.lr)
            before = allocated_bytes(cfg)
            progress["phase"] = "first step"
            first = timed(optimizer.step, cfg.device)
            state_alloc = allocated_bytes(cfg) - before if cfg.cuda else None
            progress["phase"] = "refresh cycle"
            cycle = [timed(optimizer.step, cfg.device) for _ in range(cfg.gap)]
            params = sum(p.numel() for p in model.parameters())
            row = {"optimizer": label, "source": source, "status": "ok", "first_ms": first, **summarize(cycle),
                   "state_bytes": distopt.state_bytes(optimizer), "state_alloc_bytes": state_alloc, "params": params}
            del optimizer, model
            return row

        row, failure = attempt(one, cfg, progress)
        rows.append(row or {"optimizer": label, **failure})
        free(cfg)
        print(f"  step {label}: {brief(rows[-1], 'mean_ms')}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        row["worst_vs_median"] = row["max_ms"] / row["median_ms"]
        row["state_bytes_per_param"] = row["state_bytes"] / row["params"]
        if base:
            row["amortized_x_fused_adamw"] = row["mean_ms"] / base["mean_ms"]
            row["worst_x_fused_adamw"] = row["max_ms"] / base["mean_ms"]
            row["state_x_adamw"] = row["state_bytes"] / base["state_bytes"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("mean_ms", "amortized ms", ".2f"),
        ("median_ms", "median ms", ".2f"), ("max_ms", "worst ms", ".2f"), ("first_ms", "first ms", ".1f"),
        ("amortized_x_fused_adamw", "amortized x fused AdamW", ".2f"), ("worst_vs_median", "worst/median", ".2f"),
        ("state_bytes", "state bytes", "d"), ("state_x_adamw", "state x AdamW", ".3f"), ("note", "note", "s"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "rank": cfg.rank, "gap": cfg.gap, "tf32": cfg.tf32_step,
                "timed": "one first step, then a refresh cycle of `gap` steps (amortized = its mean, worst = its max)"}
    return {"settings": settings, "rows": rows, "markdown": table}


