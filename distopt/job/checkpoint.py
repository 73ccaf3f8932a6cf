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
        meta.json             written last: its presence marks the checkpoint complete; it lists
                              every file with its size and digest
    latest                    the name of the newest complete checkpoint
    abandoned-<time>/         checkpoints later than a resumed one, moved aside (never deleted)

Every rank writes into ``.step_00000400.tmp``; once all have finished, rank 0 adds ``meta.json``
and renames the folder into place, then replaces ``latest`` (temp file + ``os.replace``). A job
killed mid-write leaves only a ``.tmp`` folder, which the next save clears. Sharded engines
write their part through ``engine.save_sharded(tmp)`` and read it with ``engine.load_sharded(path)``
(both collective); the atomic folder, ``meta.json`` and ``latest`` are the same for every engine.

Integrity: a ``torch.save`` file is a zip whose index holds a CRC-32 of every record, computed by
``torch.save`` itself; the manifest keeps a CRC of that index, read from the file's end, so saving
costs no extra pass. DCP shards are hashed (XXH3-64 per 64 MiB block) as ``distopt.checkpoint``
writes them; other files (text, DeepSpeed's) after the write, spread over the ranks. Resume checks
every file's size and digest before anything is applied (:func:`verify`,
collective; the job's own files are read meanwhile), so a truncated or corrupted checkpoint is
named and skipped instead of being trained on. Resuming from a checkpoint older than the newest
starts a new branch: the later checkpoints are moved into ``abandoned-<time>/``
(:func:`start_branch`), where ``keep`` never deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from distopt import checkpoint as integrity
from distopt.checkpoint import IntegrityError

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
    digests = {}
    if engine.replicated:
        if info.is_main:
            digests["model.pt"] = integrity.save_file(engine.model_state_dict(), tmp / "model.pt")
            digests["optimizer.pt"] = integrity.save_file(engine.optimizer_state_dict(), tmp / "optimizer.pt")
    elif hasattr(engine, "save_sharded"):
        engine.save_sharded(tmp)
    else:
        for kind, state in (("model", engine.model_state_dict()), ("optimizer", engine.optimizer_state_dict())):
            digests[f"{kind}_rank{info.rank:05d}.pt"] = integrity.save_file(state, tmp / f"{kind}_rank{info.rank:05d}.pt")
    digests[f"rng_rank{info.rank:05d}.pt"] = integrity.save_file(rng_state(), tmp / f"rng_rank{info.rank:05d}.pt")
    if info.is_main:
        digests["trainer.pt"] = integrity.save_file(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_text)  # hashed below with the engine's files
    barrier()
    # The files hashed as they were saved, then the rest (config.yaml, DCP shards, DeepSpeed's),
    # spread over the ranks.
    for part in integrity.gather(digests):
        digests.update(part)
    for folder, manifest in _library_manifests(tmp).items():  # dcp/: hashed by distopt.checkpoint.save
        digests.update({f"{folder}/{name}": d for name, d in manifest.items()})
    digests.update(integrity.hash_files(tmp, [n for n in integrity.list_files(tmp) if n not in digests]))
    if info.is_main:
        meta = {"format": FORMAT, "step": step, "world_size": info.world_size, "engine": engine.name,
                "time": time.time(), "files": sorted(digests), "digests": dict(sorted(digests.items()))}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / "latest", final.name + "\n")
        if keep:  # this branch only: abandoned branches live in abandoned-*/ and are never counted
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        logger.debug("checkpoint %s written in %.1fs", final, time.perf_counter() - started)
    barrier()
    return final


def read_meta(path: Path) -> dict:
    """``meta.json`` of checkpoint ``path``; :class:`IntegrityError` when missing or unreadable."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: no meta.json (an incomplete checkpoint)") from None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}/meta.json is unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path}/meta.json is not a JSON object")
    return meta


def check_files(path: Path, meta: dict | None = None) -> None:
    """Cheap check, on one rank: every file of the manifest is there with its size."""
    meta = meta if meta is not None else read_meta(path)
    integrity.check_sizes(path, meta.get("digests") or {})


def _library_manifests(folder: Path) -> dict[str, dict]:
    """``{subfolder: manifest}`` of the subfolders written by ``distopt.checkpoint.save``."""
    out = {}
    for marker in Path(folder).glob(f"*/{integrity.COMPLETE_MARKER}"):
        manifest = integrity.read_manifest(marker.parent)
        if manifest:
            out[marker.parent.name] = manifest
    return out


def verify(path: Path, info: DistInfo, skip: tuple[str, ...] = ()) -> None:
    """Check every file's size and digest against the manifest in ``meta.json`` (collective: the
    files are spread over the ranks, and every rank learns the outcome), except those under the
    subfolders ``skip`` (which their own loader verifies). Raises :class:`IntegrityError` naming
    the first bad file. A checkpoint written without a manifest is only warned about."""
    meta = read_meta(path)
    if meta.get("digests") is None:
        if info.is_main:
            logger.warning("%s was written without file digests: its contents cannot be verified", path)
        return
    integrity.verify_files(path, {k: v for k, v in meta["digests"].items() if k.split("/", 1)[0] not in skip})


def candidates(root: Path, notes: list[str] | None = None) -> list[Path]:
    """Complete checkpoints under ``root``, newest first, the one ``latest`` names at the front.
    A ``latest`` that names an incomplete checkpoint is reported in ``notes`` (else logged)."""
    done = complete_checkpoints(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
        elif named.name:
            message = (f"WARNING: {pointer} names {named.name}, which is not a complete checkpoint (no meta.json); "
                       f"using {done[0].name if done else 'none'} instead")
            notes.append(message) if notes is not None else logger.warning(message)
    return done


def start_branch(root: Path, resumed: Path, step: int) -> Path | None:
    """Resuming at ``step``: move the checkpoints after it into ``abandoned-<time>/`` (kept, never
    counted by ``keep``) and point ``latest`` at ``resumed``'s branch. Returns that folder, if any."""
    later = [p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None and cast(int, _step_of(p)) > step]
    if not later:
        return None
    aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-{step_name(step)}"
    aside.mkdir(parents=True, exist_ok=True)
    for p in sorted(later):
        os.rename(p, aside / p.name)
    if resumed.parent == root:
        write_text_atomic(root / "latest", resumed.name + "\n")
    else:
        (root / "latest").unlink(missing_ok=True)
    _fsync_dir(root)
    return aside


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def read_file(path: Path, mmap: bool = False):
    """``torch.load(weights_only=True)``; a file that is missing, is not plain tensors and values, or
    cannot be read at all raises :class:`IntegrityError` naming it (nothing in it is executed).

    ``mmap=True`` maps the tensors from the file (copy-on-write) instead of reading them into private
    memory: the ranks of a node that each load the whole model and optimizer state then share one
    copy in the page cache, and each copies only into its own parameters and state."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise IntegrityError(f"{path.parent}: {path.name} is missing") from None
    except Exception as err:  # noqa: BLE001 - refused globals, truncation and garbage fail in many ways
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise IntegrityError(f"{path} cannot be read as a checkpoint file ({type(err).__name__}: {first[:300]})") from None


def load(path: Path, info: DistInfo, engine) -> dict:
    """Verify checkpoint ``path`` (every file's size and digest, :func:`verify`), then load model,
    optimizer and this rank's RNG; return the trainer state. Collective. Nothing is applied to the
    engine before the verification has passed, so an :class:`IntegrityError` leaves it untouched.
    Files the job loads itself are read while the verification runs; an engine that reads its own
    files (DCP, DeepSpeed) is verified first."""
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    if not engine.reads_checkpoint_of(meta["engine"]):
        raise ValueError(f"{path} was written by engine {meta['engine']!r}; resume it with engine.name={meta['engine']}")
    if not engine.replicated and not hasattr(engine, "load_sharded") and meta["world_size"] != info.world_size:
        raise ValueError(f"{path} holds {meta['world_size']} shards; resume it on {meta['world_size']} ranks")
    mine = (["model.pt", "optimizer.pt"] if engine.replicated else
            [] if hasattr(engine, "load_sharded") else [f"model_rank{info.rank:05d}.pt", f"optimizer_rank{info.rank:05d}.pt"])
    with ThreadPoolExecutor(1) as pool:
        # dcp/ verifies itself as it loads (distopt.checkpoint.load); DeepSpeed's files are checked first.
        checking = pool.submit(verify, path, info, tuple(_library_manifests(path)))
        if not mine:  # the engine reads its files itself: verify before it does
            checking.result()
        loaded = [read_file(path / name, mmap=True) for name in mine]
        checking.result()
    if loaded:
        engine.load_model_state_dict(loaded[0])
        engine.load_optimizer_state_dict(loaded[1])
        del loaded
    else:
        engine.load_sharded(path)  # refuses (ValueError) what it cannot read, e.g. ZeRO on another world size
    rng = path / f"rng_rank{info.rank:05d}.pt"
    if rng.is_file():
        set_rng_state(read_file(rng))
    elif info.is_main:
        logger.warning("%s has no RNG state for rank %d (it was written by %d ranks)", path, info.rank, meta["world_size"])
    return read_file(path / "trainer.pt")


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
