"""Shared pieces of the benchmark scripts: environment record, timing, table output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def environment(device: str) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=False).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"  # the code measured is not that commit's
    except OSError:
        commit = None
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    return {
        "device": device, "device_name": name, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Wall time of ``fn()`` in milliseconds, synchronizing the device around it."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def summarize(times_ms: list[float]) -> dict:
    return {
        "mean_ms": statistics.fmean(times_ms), "median_ms": statistics.median(times_ms),
        "max_ms": max(times_ms), "min_ms": min(times_ms), "steps": len(times_ms),
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns`` are (key, header, format); missing values print as empty cells."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (a ``torch._foreach_*`` call over a list counts
    once; so does a collective)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


# Suffix of a benchmark choice whose model distopt.pack_weights lays out first (same-shape weights in
# shared buffers).
PACKED = "-packed"


def packed_as_asked(choice: str, model: torch.nn.Module) -> str:
    """``choice`` without :data:`PACKED`; where it ended so, ``model``'s weights packed first."""
    if choice.endswith(PACKED):
        import distopt

        distopt.pack_weights(model)
    return choice.removesuffix(PACKED)


def heap_in_use():
    """A function giving the C heap's bytes in use (glibc's ``mallinfo2``: small blocks and mapped
    ones, where CPU tensors live), or ``None`` where there is no such call."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(field, ctypes.c_size_t) for field in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def peak_heap_growth(fn, in_use) -> int:
    """The most bytes the C heap held above its level at the start of ``fn()``, read after each
    aten op ``fn`` dispatches (``in_use``: :func:`heap_in_use`'s function)."""

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.start, self.peak = in_use(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use() - self.start)
            return out

    with Peak() as meter:
        fn()
    return meter.peak


@contextlib.contextmanager
def as_on_a_gpu():
    """The step as a GPU dispatches it: a CPU batch's own finiteness check (a host read per batch,
    free on a CPU) off, so every gradient goes through step()'s one check as on a GPU; and the batch
    temporaries allocated by their ops, as on a GPU, not taken from buffers kept between steps."""
    from distopt.optim import projected

    kept = projected.SELF_CHECKING_DEVICES, projected.CACHED_SCRATCH_DEVICES
    projected.SELF_CHECKING_DEVICES = projected.CACHED_SCRATCH_DEVICES = frozenset()
    try:
        yield
    finally:
        projected.SELF_CHECKING_DEVICES, projected.CACHED_SCRATCH_DEVICES = kept
