"""The GPU suite's training sections: ``e2e``, ``maxbatch``, ``7b`` and ``memory``."""

from __future__ import annotations

import dataclasses
import sys

import torch
from common import markdown_table

from distopt import memory

from .base import GIB, RUN_7B_FUSED, RUN_7B_LAYERWISE, RUN_7B_OURS, RUNS, Config, Run, _takes, attempt, distopt_name, free, largest_batch, new_rows
from .report import brief


def _train_row(label: str, shape, cfg: Config, size: int, seq: int, steps: int, *, rank: int, scale: str,
               bf16_weights: bool = False, checkpointing: bool = False, layerwise_mode: bool = False, run_name=None) -> dict:
    progress: dict = {}

    def one():
        run = Run(label, shape, cfg, rank=rank, bf16_weights=bf16_weights, checkpointing=checkpointing,
                  layerwise_mode=layerwise_mode, progress=progress)
        row = run.measure(size, seq, steps)
        row["hparams"] = run.hparams
        del run
        return row

    free(cfg)
    row, failure = attempt(one, cfg, progress)
    row = {"run": run_name or label, "optimizer": label, "status": "ok", **(row or failure), "scale": scale,
           "weights": "bf16" if bf16_weights else "fp32 master, bf16 autocast",
           "checkpointing": checkpointing and cfg.impl == "hf", "layerwise": layerwise_mode, "model": cfg.impl}
    if checkpointing and cfg.impl != "hf":
        row["note"] = "no activation checkpointing: it needs transformers"
    RUNS[(scale, run_name or label)] = row
    free(cfg)
    print(f"  {scale} {run_name or label}: {brief(row, 'tokens_per_s')}", file=sys.stderr, flush=True)
    return row


def section_e2e(cfg: Config, labels: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchors' end-to-end runs
    rows = new_rows()
    for label in labels:
        rows.append(_train_row(label, cfg.shape_1b, cfg, cfg.batch, cfg.seq, cfg.e2e_steps, rank=cfg.rank, scale="1b"))
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["peak_gib"] = None if row["peak_bytes"] is None else row["peak_bytes"] / GIB
            if base:
                row["tokens_x_adamw"] = row["tokens_per_s"] / base["tokens_per_s"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("batch", "batch", "d"), ("seq", "seq", "d"),
        ("mean_ms", "step ms (mean)", ".1f"), ("median_ms", "median ms", ".1f"), ("first_ms", "first ms", ".0f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("tokens_x_adamw", "x AdamW", ".3f"), ("peak_gib", "peak GiB", ".2f"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "model": cfg.impl, "batch": cfg.batch, "seq": cfg.seq,
                "steps": cfg.e2e_steps, "rank": cfg.rank, "gap": cfg.gap, "autocast": "bf16", "tf32": cfg.cuda}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_maxbatch(cfg: Config, labels: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = new_rows()
    for label in labels:
        progress: dict = {}

        def one(label=label, progress=progress):
            run = Run(label, cfg.shape_1b, cfg, rank=cfg.rank, progress=progress)

            def fits(size: int) -> bool:
                def tries():
                    ids = run.batch(size, cfg.seq)
                    for _ in range(cfg.maxbatch_try_steps):
                        run.step(ids)

                _, failure = attempt(tries, cfg, progress)
                run.optimizer.zero_grad(set_to_none=True)
                free(cfg)
                if failure and failure["status"] != "OOM":
                    raise RuntimeError(failure["message"])
                print(f"    {label} batch {size}: {'fits' if failure is None else 'OOM'}", file=sys.stderr, flush=True)
                return failure is None

            search = largest_batch(fits, start=1, cap=cfg.maxbatch_cap)
            row = {"max_batch": search["max_batch"], "capped": search["capped"], "tried": search["tried"]}
            if search["max_batch"]:
                measured, failure = attempt(lambda: run.measure(search["max_batch"], cfg.seq, cfg.e2e_steps), cfg, progress)
                row.update(measured or {**failure, "status": f"{failure['status']} when timing the largest batch"})
            return row

        free(cfg)
        row, failure = attempt(one, cfg, progress)
        rows.append({"optimizer": label, "status": "ok", **(row or failure)})
        free(cfg)
        print(f"  maxbatch {label}: {brief(rows[-1], 'tokens_per_s')}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok" and r.get("tokens_per_s")), None)
    for row in rows:
        if row["status"] == "ok" and row.get("tokens_per_s"):
            row["peak_gib"] = None if row.get("peak_bytes") is None else row["peak_bytes"] / GIB
            row["tries"] = len(row["tried"])
            if base:
                row["tokens_x_adamw"] = row["tokens_per_s"] / base["tokens_per_s"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("max_batch", "max batch", "d"),
        ("capped", "capped", ""), ("seq", "seq", "d"), ("tokens_per_s", "tokens/s", ".0f"),
        ("tokens_x_adamw", "x AdamW (at its max batch)", ".3f"), ("peak_gib", "peak GiB", ".2f"), ("tries", "tries", "d"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "seq": cfg.seq, "cap": cfg.maxbatch_cap,
                "steps_per_try": cfg.maxbatch_try_steps, "search": "doubling from 1, then bisection"}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_7b(cfg: Config, optimizer: str, adamw_rows: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = new_rows()
    rows.append(_train_row(optimizer, cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b, rank=cfg.rank_7b,
                           scale="7b", bf16_weights=True, checkpointing=True, layerwise_mode=True,
                           run_name=RUN_7B_OURS.format(optimizer)))
    for variant in adamw_rows:
        if variant == "fused":  # the usual recipe: fp32 master weights, bf16 autocast, fused AdamW
            rows.append(_train_row("adamw-fused", cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b,
                                   rank=cfg.rank_7b, scale="7b", checkpointing=True,
                                   run_name=RUN_7B_FUSED))
        elif variant == "layerwise":  # AdamW with every memory saving the flagship row uses
            rows.append(_train_row("adamw", cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b,
                                   rank=cfg.rank_7b, scale="7b", bf16_weights=True, checkpointing=True,
                                   layerwise_mode=True, run_name=RUN_7B_LAYERWISE))
    for row in rows:
        row["peak_gib"] = None if row.get("peak_bytes") is None else row["peak_bytes"] / GIB
        row["tried_gib"] = None if row.get("tried_bytes") is None else row["tried_bytes"] / GIB
    table = markdown_table(rows, [
        ("run", "run", "s"), ("status", "status", "s"), ("batch", "batch", "d"), ("seq", "seq", "d"),
        ("mean_ms", "step ms", ".0f"), ("tokens_per_s", "tokens/s", ".0f"), ("peak_gib", "peak GiB", ".2f"),
        ("phase", "failed in", "s"), ("tried_gib", "tried to allocate GiB", ".2f"), ("note", "note", "s"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_7b), "model": cfg.impl, "batch": cfg.batch_7b,
                "seq": cfg.seq_7b, "steps": cfg.steps_7b, "rank": cfg.rank_7b, "gap": cfg.gap}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_memory(cfg: Config, flagship: list[str], optimizer_7b: str, adamw_rows: list[str]) -> dict:
    """``distopt memory``'s model-state estimate (engine single, one rank) against the measured
    peak of each 1B and 7B run; runs that were not measured in this process are run here."""
    from distopt.job.modeling import build_model

    plans = [("1b", label, label, "bf16-mixed", {}) for label in ["adamw-fused", *flagship]]
    plans.append(("7b", RUN_7B_OURS.format(optimizer_7b), optimizer_7b, "bf16",
                  {"bf16_weights": True, "checkpointing": True, "layerwise_mode": True}))
    if "fused" in adamw_rows:
        plans.append(("7b", RUN_7B_FUSED, "adamw-fused", "bf16-mixed", {"checkpointing": True}))
    if "layerwise" in adamw_rows:
        plans.append(("7b", RUN_7B_LAYERWISE, "adamw", "bf16",
                      {"bf16_weights": True, "checkpointing": True, "layerwise_mode": True}))
    metas = {}
    rows = new_rows()
    for scale, run_name, label, precision, options in plans:
        shape = cfg.shape_1b if scale == "1b" else cfg.shape_7b
        rank = cfg.rank if scale == "1b" else cfg.rank_7b
        measured = RUNS.get((scale, run_name))
        if measured is None:
            size, seq = (cfg.batch, cfg.seq) if scale == "1b" else (cfg.batch_7b, cfg.seq_7b)
            measured = _train_row(label, shape, cfg, size, seq, 2, rank=rank, scale=scale, run_name=run_name, **options)
        name = distopt_name(label) or ("adamw" if label.startswith("adamw") else None)
        row = {"scale": scale, "run": run_name, "precision": precision, "status": measured.get("status"),
               "batch": measured.get("batch"), "seq": measured.get("seq")}
        if name is None:
            row["note"] = f"{label} has no distopt estimate"
        else:
            if scale not in metas:
                with torch.device("meta"):
                    metas[scale] = build_model(shape, cfg.impl)
            hparams = {k: v for k, v in (measured.get("hparams") or {}).items() if k != "lr"}
            if name != "adamw" and not hparams:
                hparams = {k: v for k, v in (("rank", rank), ("update_proj_gap", cfg.gap)) if _takes(name, k)}
            b = memory.estimate(metas[scale], name, "single", 1, precision, hparams=hparams)
            row.update(estimate_bytes=b.total, estimate_weights=b.weights, estimate_gradients=b.gradients,
                       estimate_state=b.optimizer_state, estimate_projectors=b.projectors, estimate_hparams=hparams)
            if options.get("layerwise_mode"):
                row["note"] = "layer-wise mode frees each gradient in backward; the estimate counts all of them"
        ok = measured.get("status") == "ok"
        row["measured_state_bytes"] = measured.get("state_bytes") if ok else None
        if ok and row.get("estimate_bytes") is not None and row["measured_state_bytes"]:
            row["state_x_estimate"] = row["measured_state_bytes"] / (row["estimate_state"] + row["estimate_projectors"])
        peak = measured.get("peak_bytes") if ok else None
        states = measured.get("after_step_bytes") if ok else None
        row.update(measured_peak_bytes=peak, measured_states_bytes=states)
        if not ok:
            row["peak_at_failure_bytes"] = measured.get("peak_bytes")
            row["tried_bytes"] = measured.get("tried_bytes")
        if row.get("estimate_bytes"):
            row["estimate_gib"] = row["estimate_bytes"] / GIB
            if peak:
                row["peak_gib"] = peak / GIB
                row["peak_x_estimate"] = peak / row["estimate_bytes"]
            if states:
                row["states_gib"] = states / GIB
                row["states_x_estimate"] = states / row["estimate_bytes"]
        rows.append(row)
    table = markdown_table(rows, [
        ("scale", "model", "s"), ("run", "run", "s"), ("status", "status", "s"), ("estimate_bytes", "estimate bytes", "d"),
        ("estimate_gib", "estimate GiB", ".2f"), ("measured_state_bytes", "optimizer state bytes", "d"), ("state_x_estimate", "state / estimated state", ".3f"),
        ("peak_gib", "measured peak GiB", ".2f"), ("peak_x_estimate", "peak / estimate", ".3f"),
        ("states_gib", "after-step GiB", ".2f"), ("states_x_estimate", "after-step / estimate", ".3f"),
        ("note", "note", "s"),
    ])
    settings = {"estimate": "distopt.memory.estimate(engine='single', world_size=1): weights, gradients, optimizer "
                            "state and projectors; activations are not counted",
                "after_step": "memory allocated right after the first optimizer step (weights, gradients, state)",
                "state": "distopt.state_bytes of the run's optimizer against the estimate's state + projectors"}
    return {"settings": settings, "rows": rows, "markdown": table}


# -- goals --------------------------------------------------------------------------------------
