"""Shared pieces of the benchmark scripts: environment record, timing, table output."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import threading
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def _storages(tensors):
    """The storages under ``tensors`` (a wrapper subclass such as a DTensor: its inner tensors'); a
    tensor with none (sparse, say) is left out."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    stack, out = list(tensors), []
    while stack:
        t = stack.pop()
        if is_traceable_wrapper_subclass(t):
            stack.extend(inner for name in t.__tensor_flatten__()[0]
                         if isinstance(inner := getattr(t, name), torch.Tensor))
        elif t.device.type != "meta":
            try:
                out.append(t.untyped_storage())
            except (RuntimeError, NotImplementedError):
                pass
    return out


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)  # a compiler's stand-in: no memory


class _TensorBytes(TorchDispatchMode):
    """The tensor bytes held after each aten op (:func:`peak_tensor_bytes`)."""

    def __init__(self):
        super().__init__()
        self.timeline = [0]  # bytes held above the start, after each op
        self.watched: weakref.WeakSet = weakref.WeakSet()
        self.uses: dict[int, int] = {}  # a storage's address -> the index of the last op that used it
        self.main = threading.get_ident()
        self.lock = threading.RLock()  # a process group's thread may count off while an op is counted
        # Garbage collected first and not while measured: an earlier model's cycles freed mid-step would
        # count off against the step's own tensors.
        gc.collect()
        self.watch(_storages([t for t in gc.get_objects() if issubclass(type(t), torch.Tensor) and not _fake(t)]))

    def watch(self, storages) -> int:
        """Each of ``storages`` not watched yet counts off when freed; their bytes."""
        total = 0
        for storage in storages:
            if storage not in self.watched:
                self.watched.add(storage)
                weakref.finalize(storage, self.freed, storage.nbytes(), [storage._cdata])
                total += storage.nbytes()
        return total

    def freed(self, nbytes: int, key: list) -> None:
        # A collective's buffers may be let go by the process group's thread, an instant after the
        # caller's last reference: counted off after their last use, so the peak does not depend on
        # thread timing.
        with self.lock:
            since, last = len(self.timeline) - 1, self.uses.pop(key[0], None)
            if threading.get_ident() != self.main and last is not None:
                since = last
            for i in range(since, len(self.timeline)):
                self.timeline[i] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = _storages(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        made = _storages(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        known = {s._cdata for s in given}
        with self.lock:
            self.timeline.append(self.timeline[-1] + self.watch(s for s in made if s._cdata not in known))
            for storage in (*given, *made):
                self.uses[storage._cdata] = len(self.timeline) - 1
        return out


def peak_tensor_bytes(fn) -> int:
    """The most bytes of tensor storage held above the level at the start of ``fn()``, read after
    each aten op it dispatches: what ``torch.cuda.max_memory_allocated()`` shows above its start,
    without the caching allocator's rounding. A storage counts from the op that returned it new (not
    a view, not an in-place or ``out=`` result) until it is freed; one alive at the start (found
    through the garbage collector) counts off when it is freed; what an op makes and frees inside it
    does not count. Repeatable: the same step gives the same bytes."""
    meter = _TensorBytes()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with meter:
            fn()
    finally:
        if enabled:
            gc.enable()
    return max(meter.timeline)


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
