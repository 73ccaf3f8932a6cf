"""Checkpoints: atomic writes, the ``latest`` pointer, exact resume, and preemption.

Layout under ``<out_dir>/checkpoints``::

    step_00000400/            one finished checkpoint
        model.pt              model state dict (rank 0: single, ddp)
        optimizer.pt          optimizer state dict, keyed by parameter name (rank 0: single, ddp)
        dcp/                  fsdp2, hsdp: model and optimizer through torch.distributed.checkpoint,
                              every rank writing its shards; resumes on any number of ranks
        deepspeed/            zero1/2/3: DeepSpeed's checkpoint (engine.save_checkpoint, every rank);
                              on another number of ranks it is merged and re-partitioned on load
        trainer.pt            step, samples consumed, lr schedule, run identity
        rng_rank00000.pt      each rank's RNG states
        config.yaml           the resolved run config
        meta.json             written last: its presence marks the checkpoint complete
    latest                    the name of the newest complete checkpoint

Every rank writes into ``.step_00000400.tmp``; once all have finished, rank 0 adds ``meta.json``
and renames the folder into place, then replaces ``latest`` (temp file + ``os.replace``). A job
killed mid-write leaves only a ``.tmp`` folder, which the next save clears. Sharded engines
write their part through ``engine.save_sharded(tmp)`` and read it with ``engine.load_sharded(path)``
(both collective); the atomic folder, ``meta.json`` and ``latest`` are the same for every engine.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .dist import DistInfo, barrier

logger = logging.getLogger("distopt.train")

FORMAT = 1


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, info: DistInfo, engine, trainer_state: dict, config_text: str, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it)."""
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    started = time.perf_counter()
    files = []
    if engine.replicated:
        if info.is_main:
            save_file(engine.model_state_dict(), tmp / "model.pt")
            save_file(engine.optimizer_state_dict(), tmp / "optimizer.pt")
            files += ["model.pt", "optimizer.pt"]
    elif hasattr(engine, "save_sharded"):
        engine.save_sharded(tmp)
    else:
        save_file(engine.model_state_dict(), tmp / f"model_rank{info.rank:05d}.pt")
        save_file(engine.optimizer_state_dict(), tmp / f"optimizer_rank{info.rank:05d}.pt")
    save_file(rng_state(), tmp / f"rng_rank{info.rank:05d}.pt")
    if info.is_main:
        save_file(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_text)
    barrier()
    if info.is_main:
        meta = {"format": FORMAT, "step": step, "world_size": info.world_size, "engine": engine.name,
                "time": time.time(), "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / "latest", final.name + "\n")
        if keep:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        logger.debug("checkpoint %s written in %.1fs", final, time.perf_counter() - started)
    barrier()
    return final


def load(path: Path, info: DistInfo, engine) -> dict:
    """Load model, optimizer and this rank's RNG from checkpoint ``path``; return the trainer state."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    if not engine.reads_checkpoint_of(meta["engine"]):
        raise ValueError(f"{path} was written by engine {meta['engine']!r}; resume it with engine.name={meta['engine']}")
    if engine.replicated:
        engine.load_model_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        engine.load_optimizer_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    elif hasattr(engine, "load_sharded"):
        engine.load_sharded(path)  # refuses (ValueError) what it cannot read, e.g. ZeRO on another world size
    else:
        if meta["world_size"] != info.world_size:
            raise ValueError(f"{path} holds {meta['world_size']} shards; resume it on {meta['world_size']} ranks")
        engine.load_model_state_dict(torch.load(path / f"model_rank{info.rank:05d}.pt", map_location="cpu", weights_only=True))
        engine.load_optimizer_state_dict(torch.load(path / f"optimizer_rank{info.rank:05d}.pt", map_location="cpu", weights_only=True))
    rng = path / f"rng_rank{info.rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    elif info.is_main:
        logger.warning("%s has no RNG state for rank %d (it was written by %d ranks)", path, info.rank, meta["world_size"])
    return torch.load(path / "trainer.pt", weights_only=True)


class Preemption:
    """Turns SIGTERM (Slurm preemption, ``scancel``, torchrun shutting down) and SIGUSR1 (Slurm's
    ``--signal`` warning) into a request to checkpoint at the end of the current step and exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> Preemption:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            logger.warning("received %s: writing a checkpoint after this step, then exiting", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return bool(self.signum)


def any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
