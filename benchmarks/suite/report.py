"""The GPU suite's goals against the anchors, and the formatting of its tables."""

from __future__ import annotations

import re

from .base import ANCHORS, GIB, GOALS, Config


def _ok(rows, key, value):
    return next((r for r in rows if r.get(key) == value and r.get("status") == "ok"), None)


def goals(cfg: Config, sections: dict, flagship: list[str], optimizer_7b: str, limit_bytes: int | None) -> list[dict]:
    out = []

    def add(goal, target, measured, met, anchor=None):
        out.append({"goal": goal, "target": target, "measured": measured, "met": met, "anchor": anchor})

    if "step" in sections:
        rows = sections["step"]["rows"]
        gt = _ok(rows, "optimizer", "galore-torch")
        for label in flagship:
            r = _ok(rows, "optimizer", label)
            x = r.get("amortized_x_fused_adamw") if r else None
            add(f"step: {label} amortized step x torch fused AdamW", f"<= {GOALS['step_x_adamw']}",
                x, None if x is None else x <= GOALS["step_x_adamw"],
                f"galore-torch {ANCHORS['step_galore_torch_r512_amortized_x_adamw']}x (H100)"
                + (f"; here {gt['amortized_x_fused_adamw']:.2f}x" if gt and gt.get("amortized_x_fused_adamw") else ""))
    if "e2e" in sections:
        for label in flagship:
            r = _ok(sections["e2e"]["rows"], "optimizer", label)
            x = r.get("tokens_x_adamw") if r else None
            add(f"e2e: {label} tokens/s x AdamW at batch {cfg.batch} x {cfg.seq}", f">= {GOALS['e2e_x_adamw']}",
                x, None if x is None else x >= GOALS["e2e_x_adamw"],
                f"AdamW {ANCHORS['e2e_adamw_fused_tokens_per_s']} tokens/s, galore-torch "
                f"{ANCHORS['e2e_galore_torch_r512_tokens_per_s']} (H100)")
    if "maxbatch" in sections:
        for r in sections["maxbatch"]["rows"]:
            if r["optimizer"] == "adamw-fused":
                continue
            x = r.get("tokens_x_adamw") if r.get("status") == "ok" else None
            add(f"equal memory: {r['optimizer']} tokens/s at its largest batch x AdamW at its largest",
                f">= {GOALS['maxbatch_x_adamw']}", x, None if x is None else x >= GOALS["maxbatch_x_adamw"])
    if "7b" in sections:
        r = sections["7b"]["rows"][0]
        bar = GOALS["7b_gpu_gib"] * GIB
        peak = r.get("peak_bytes")
        met = None
        if r.get("status") == "OOM":
            met = False
        elif r.get("status") == "ok" and peak is not None:
            met = peak <= bar
        add(f"7b: {optimizer_7b} trains on one {GOALS['7b_gpu_gib']} GB GPU at batch {cfg.batch_7b} x {cfg.seq_7b}",
            f"no OOM under a limit <= {GOALS['7b_gpu_gib']} GiB", None if peak is None else f"peak {peak / GIB:.2f} GiB",
            met, None if limit_bytes is None else f"memory limit {limit_bytes / GIB:.1f} GiB")
    if "memory" in sections:
        for r in sections["memory"]["rows"]:
            if r.get("status") != "ok":  # a run that did not fit has no peak to compare
                continue
            x = r.get("peak_x_estimate")
            add(f"memory: {r['scale']} {r['run']} measured peak / estimate", f"within {GOALS['memory_error']:.0%}",
                x, None if x is None else abs(x - 1) <= GOALS["memory_error"])
    for g in out:
        g["evidence"] = cfg.cuda and not cfg.tiny
    return out


def brief(row: dict, key: str) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')} {row.get('note') or row.get('message') or ''}".strip()
    value = row.get(key)
    return f"{key}={value:.4g}" if isinstance(value, (int, float)) else "ok"


def format_measured(value) -> str:
    return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


# -- main ---------------------------------------------------------------------------------------
def csv_list(text: str) -> list[str]:
    """Comma-separated labels; commas inside a label's ``[...]`` stay in it."""
    return [x.strip() for x in re.split(r",(?![^\[]*\])", text) if x.strip()]


