"""What the job shows: the rank-0 progress line, the JSONL metrics, the loss plot, the summary."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("distopt.train")


def _in_thousands(n: float, units: tuple[str, ...], sep: str) -> str:
    """``n`` in the largest of ``units`` (steps of 1000) that keeps it below 1000; whole in the first."""
    n, index = float(n), 0
    while abs(n) >= 1000 and index < len(units) - 1:
        n, index = n / 1000, index + 1
    return f"{n:.0f}{sep}{units[0]}" if index == 0 else f"{n:.1f}{sep}{units[index]}"


def human_bytes(n: float) -> str:
    return _in_thousands(n, ("B", "KB", "MB", "GB", "TB"), " ")


def human_count(n: float) -> str:
    return _in_thousands(n, ("", "k", "M", "B", "T"), "")


def human_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory of this rank: CUDA allocator peak on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "cpu_max_rss"


class JsonlLog:
    """Append-only JSONL; on resume, records past the resumed step are dropped first."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [json.dumps(r) for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(dumps(record) + "\n")


def finite(obj):
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON (non-finite floats become null)."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn line (a write cut short by a kill) is skipped with a warning."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.warning("%s: line %d is not valid JSON (a write cut short?); skipped", path, number)
    return records


class Progress:
    """Rank 0's progress: an in-place bar on a terminal, one line per ``every`` steps otherwise."""

    def __init__(self, total: int, start: int, mode: str, every: int, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.enabled = enabled and self.mode != "off"
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()
        self.val: float | None = None
        self.width = 24
        self._last_len = 0

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        frac = step / self.total
        parts = [f"step {step}/{self.total}"]
        if self.mode == "bar":
            filled = int(frac * self.width)
            parts[0] += f" [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%}"
        parts += [f"loss {loss:.4f}"]
        if self.val is not None:
            parts.append(f"val {self.val:.4f}")
        parts += [f"lr {lr:.2e}", f"{human_count(tokens_per_s)} tok/s", f"{human_time(elapsed)}<{human_time(eta)}"]
        line = " | ".join(parts)
        if self.mode == "bar":
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
            if step >= self.total:
                self.stream.write("\n")
                self._last_len = 0
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.mode == "bar" and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.mode == "bar" and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


def ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_runs(runs: dict[str, Path], out: Path, title: str) -> Path | None:
    """One figure: train loss (smoothed) and validation loss of each run's metrics.jsonl.
    Returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, path) in enumerate(runs.items()):
        records = read_jsonl(path)
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
        color = colors[i % len(colors)]
        prefix = f"{label} " if len(runs) > 1 else ""
        if train:
            steps, losses = zip(*train)
            if len(losses) > 200:  # records are already means over log.every steps; smooth only long runs
                if len(runs) == 1:
                    ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(list(losses), 0.95), color=color, label=f"{prefix}train (smoothed)")
            else:
                ax.plot(steps, losses, color=color, linewidth=1.2, label=f"{prefix}train")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o--", color=color, markersize=3.5, linewidth=1, label=f"{prefix}validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


PLOT_HINT = (
    "matplotlib is not installed, so no PNG was drawn (pip install 'distopt[plot]'); "
    "the curve is in {jsonl}: records with kind=train carry step and loss, kind=eval carry val_loss"
)


def summary_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    rule = "-" * max(60, min(100, max(len(v) for _, v in rows) + width + 3))
    lines = [rule, title, rule]
    lines += [f"{k:<{width}}   {v}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(obj, indent=1))
    os.replace(tmp, path)
