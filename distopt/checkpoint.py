"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), resumable on another world size.

The optimizer's state dict is keyed by parameter name; under FSDP2 its row-sharded tensors are
DTensors with the parameter's placement, so DCP writes each rank's rows once and reads back exactly
the rows a new layout needs (2 ranks -> 3 ranks -> 1 process). Replicated tensors are written once.

A checkpoint is written into ``<path>.tmp`` and renamed to ``<path>`` only after every rank has
finished, so a save killed midway never leaves a directory that loads as valid. The completion
marker lists every file with its size and CRC-32 (hashed by all ranks, each a share of the files);
:func:`load` checks them all before reading a tensor, so a truncated or corrupted checkpoint raises
:class:`IntegrityError` naming the file instead of loading garbage. The same helpers serve the
training job's checkpoints (``launch/checkpoint.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .optim.base import SubspaceOptimizer

COMPLETE_MARKER = ".distopt-complete"
logger = logging.getLogger("distopt")


# -- integrity: sizes and CRC-32 of every file --------------------------------------------------------
class IntegrityError(ValueError):
    """A checkpoint file is missing, has the wrong size, or its CRC-32 differs from the manifest."""


def save_file(obj, path: Path) -> dict:
    """``torch.save`` with fsync; returns the file's digest (:func:`file_digest`)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return file_digest(path)


def file_digest(path: Path, chunk: int = 1 << 24) -> dict:
    """Size and CRC-32 of ``path``. A ``torch.save`` file is a zip whose index already holds a
    CRC-32 of every record (computed by ``torch.save`` as it wrote them): its digest is the CRC of
    that index, read from the end of the file, so saving costs nothing more; :func:`check` then
    checks every record against it. Any other file is CRC'd in 64 MiB blocks on several threads."""
    path = Path(path)
    index = _whole_zip_index(path)
    if index is not None:
        return {"bytes": path.stat().st_size, "zip_index": f"{index:08x}"}
    size = path.stat().st_size
    return {"bytes": size, "block_crc32": f"{_block_crc(path, size, chunk):08x}"}


BLOCK = 1 << 26  # bytes per independently CRC'd block of a file that is not a torch.save zip
THREADS = max(1, min(8, os.cpu_count() or 1))


def _block_crc(path: Path, size: int, chunk: int) -> int:
    """CRC-32 of the CRC-32s of ``path``'s 64 MiB blocks, computed on up to :data:`THREADS` threads."""

    def one(index: int) -> int:
        crc, left = 0, min(BLOCK, size - index * BLOCK)
        with open(path, "rb") as fh:
            fh.seek(index * BLOCK)
            while left > 0 and (block := fh.read(min(chunk, left))):
                crc, left = zlib.crc32(block, crc), left - len(block)
        return crc

    blocks = max(1, -(-size // BLOCK))
    with ThreadPoolExecutor(min(THREADS, blocks)) as pool:
        crcs = list(pool.map(one, range(blocks)))
    return zlib.crc32(b"".join(c.to_bytes(4, "little") for c in crcs))


PARALLEL_CRC_BYTES = 1 << 20  # writes at least this large are CRC'd beside the write
_CRC_POOL = None


def _crc_pool() -> ThreadPoolExecutor:
    global _CRC_POOL
    if _CRC_POOL is None:
        _CRC_POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="distopt-crc")
    return _CRC_POOL


class _BlockCrcWriter:
    """A write-only stream that CRCs what passes through it in :data:`BLOCK`-sized blocks, as
    :func:`_block_crc` would read them back, and reports ``(bytes, block CRC)`` when closed."""

    def __init__(self, raw, on_close):
        self._raw, self._on_close = raw, on_close
        self._crcs: list[int] = []
        self._crc = self._fill = self._size = 0
        self._done = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= PARALLEL_CRC_BYTES:
            # zlib and the file write both release the GIL: CRC on a helper thread while the bytes
            # are written, and return only once both are done (the caller may reuse its buffer).
            hashing = _crc_pool().submit(self._hash, view)
            try:
                written = self._raw.write(view)
            finally:
                hashing.result()
            written = len(view) if written is None else written
            if written != len(view):  # a short write: hash what was written, not what was offered
                raise OSError(f"short write ({written} of {len(view)} bytes)")
        else:
            written = self._raw.write(view)
            written = len(view) if written is None else written
            self._hash(view[:written])
        self._size += written
        return written

    def _hash(self, view: memoryview) -> None:
        while view:
            take = min(len(view), BLOCK - self._fill)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == BLOCK:
                self._crcs.append(self._crc)
                self._crc = self._fill = 0

    def close(self) -> None:
        if not self._done:
            self._done = True
            if self._fill or not self._crcs:
                self._crcs.append(self._crc)
            self._on_close(self._size, zlib.crc32(b"".join(c.to_bytes(4, "little") for c in self._crcs)))
        self._raw.close()

    def __getattr__(self, name):  # tell, flush, fileno, ... of the real file
        return getattr(self._raw, name)


def hashing_writer(folder: Path):
    """A DCP ``FileSystemWriter`` into ``folder`` that CRCs every file as it writes it: no file is
    read back. Its ``digests`` holds ``{file name: digest}`` of the files this rank wrote."""
    import threading
    from contextlib import contextmanager

    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        def __init__(self):
            super().__init__()
            self.digests: dict[str, dict] = {}
            self._lock = threading.Lock()

        @contextmanager
        def create_stream(self, path, mode):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            name = Path(path).name

            def record(size: int, crc: int) -> None:
                with self._lock:
                    self.digests[name] = {"bytes": size, "block_crc32": f"{crc:08x}"}

            with open(path, mode) as raw:
                stream = _BlockCrcWriter(raw, record)
                try:
                    yield stream
                finally:
                    stream.close()

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            with self._lock:
                if Path(path).name in self.digests:
                    self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)

    writer = dcp.FileSystemWriter(str(folder))
    writer.fs = HashingFileSystem()
    return writer


def _data_start(fh, info: zipfile.ZipInfo) -> int | None:
    """Offset of a record's data, after its local header; None where no local header is."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def _whole_zip_index(path: Path) -> int | None:
    """The index CRC of ``path`` if it is one uncompressed zip whose records tile it from byte 0 to
    its index (a ``torch.save`` file), else None: a file that merely contains a zip is CRC'd whole."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04" or not zipfile.is_zipfile(fh):
                return None
            with zipfile.ZipFile(fh) as archive:
                records = sorted(archive.infolist(), key=lambda i: i.header_offset)
                end = 0
                for info in records:
                    start = _data_start(fh, info)
                    if info.header_offset != end or info.compress_type != zipfile.ZIP_STORED or start is None:
                        return None
                    end = start + info.compress_size
                    if info.flag_bits & 0x08:  # a data descriptor (CRC and sizes again) follows the data
                        fh.seek(end)
                        end += 16 if fh.read(4) == b"PK\x07\x08" else 12
                return _zip_index(archive) if end == archive.start_dir else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _zip_index(archive: zipfile.ZipFile) -> int:
    entries = "".join(f"{i.filename}:{i.CRC:08x}:{i.file_size}:{i.header_offset};" for i in archive.infolist())
    return zlib.crc32(entries.encode())


def _bad_record(path: Path, records: list[zipfile.ZipInfo], chunk: int = 1 << 24) -> str | None:
    """The first record of an uncompressed zip whose bytes do not match its CRC-32, or None."""
    with open(path, "rb") as fh:
        for info in records:
            start = _data_start(fh, info)
            if start is None:
                return info.filename
            fh.seek(start)
            crc, left = 0, info.compress_size
            while left > 0:
                block = fh.read(min(chunk, left))
                if not block:
                    return info.filename
                crc, left = zlib.crc32(block, crc), left - len(block)
            if crc != info.CRC or info.compress_type != zipfile.ZIP_STORED:
                return info.filename
    return None


def _size_problem(path: Path, want: dict) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path.name} is missing"
    return None if size == want["bytes"] else f"{path.name} has {size} bytes, the checkpoint wrote {want['bytes']}"


def check(path: Path, want: dict) -> str | None:
    """What is wrong with ``path`` against its manifest entry ``want``, or None. Reads every byte."""
    path = Path(path)
    if problem := _size_problem(path, want):
        return problem
    if "zip_index" in want:
        try:
            with zipfile.ZipFile(path) as archive:
                if f"{_zip_index(archive):08x}" != want["zip_index"]:
                    return f"{path.name} is corrupted (its record index differs from the one written)"
                bad = _bad_record(path, archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"{path.name} is corrupted ({err})"
        return None if bad is None else f"{path.name} is corrupted (record {bad} fails its CRC-32)"
    got = f"{_block_crc(path, want['bytes'], 1 << 24):08x}"
    return None if got == want.get("block_crc32") else f"{path.name} is corrupted (its block CRC-32 differs from the one written)"


def list_files(folder: Path) -> list[str]:
    """Every file under ``folder``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def gather(obj) -> list:
    """``obj`` of every rank (collective; ``[obj]`` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _on_my_share(fn, names: list[str]) -> dict:
    """``{name: fn(name)}`` for this rank's round-robin share of ``names``, two files at a time."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = names[rank::world]
    with ThreadPoolExecutor(min(2, max(1, len(mine)))) as pool:
        return dict(zip(mine, pool.map(fn, mine)))


def hash_files(folder: Path, names: list[str]) -> dict:
    """Digests of ``names`` under ``folder``: each rank hashes a round-robin share, and every rank
    gets them all (collective)."""
    local = _on_my_share(lambda n: file_digest(Path(folder) / n), names)
    return {k: v for part in gather(local) for k, v in part.items()}


def check_sizes(folder: Path, manifest: dict) -> None:
    """Cheap, on one rank: every file of ``manifest`` exists with its size. Raises :class:`IntegrityError`."""
    for name, want in manifest.items():
        if problem := _size_problem(Path(folder) / name, want):
            raise IntegrityError(f"{folder}: {problem}")


def _agree_on_sizes(folder: Path, manifest: dict) -> None:
    """:func:`check_sizes` on every rank, and every rank raises if any found a problem (collective)."""
    problem = None
    try:
        check_sizes(folder, manifest)
    except IntegrityError as err:
        problem = str(err)
    raise_if_any([p for p in gather(problem) if p])


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file of ``manifest`` exists with its size and CRC-32 (collective: each rank reads a
    round-robin share). Raises :class:`IntegrityError` naming the first bad file, on every rank."""
    _agree_on_sizes(folder, manifest)
    raise_if_any([p for part in gather(local_problems(folder, manifest)) for p in part])


def local_problems(folder: Path, manifest: dict) -> list[str]:
    """This rank's round-robin share of :func:`verify_files`, with no collective: it can run on a
    helper thread beside a load. Returns what is wrong."""
    found = _on_my_share(lambda n: check(Path(folder) / n, manifest[n]), sorted(manifest))
    return [f"{folder}: {p}" for p in found.values() if p]


def raise_if_any(problems: list[str]) -> None:
    if problems:
        raise IntegrityError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def read_manifest(path: Path) -> dict | None:
    """The file digests in the completion marker; None for a checkpoint written before digests."""
    text = (path / COMPLETE_MARKER).read_text()
    try:
        marker = json.loads(text)
    except ValueError:
        if text.strip() == "ok":
            return None
        raise IntegrityError(f"{path}/{COMPLETE_MARKER} is unreadable") from None
    return marker.get("files") if isinstance(marker, dict) else None


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """DCP-ready optimizer state: distopt's name-keyed dict, or torch's for other optimizers."""
    if isinstance(optimizer, SubspaceOptimizer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as torch_get

    return torch_get(model, optimizer)


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    if isinstance(optimizer, SubspaceOptimizer):
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    torch_set(model, optimizer, state_dict)


def _header(optim_state: dict) -> str:
    """What must match for a checkpoint to load, as one string (read before any tensor)."""
    meta = optim_state.get("distopt", {"algorithm": "torch", "shape_hparams": []})
    return json.dumps({"algorithm": meta["algorithm"], "shape_hparams": meta["shape_hparams"]}, sort_keys=True)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def save(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> Path:
    """Write model, optimizer and ``extra`` (plain values and tensors) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_main() and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    optim_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": optim_state, "extra": extra or {},
             "header": _header(optim_state)}
    writer = hashing_writer(tmp)
    dcp.save(state, storage_writer=writer)
    _barrier()
    # Each rank CRC'd the files it wrote as it wrote them; anything else is read back. Rank 0's listing,
    # taken before the gather (after it, rank 0 may already rename the folder), is every rank's.
    parts = gather((writer.fs.digests, list_files(tmp) if _is_main() else None))
    manifest = {k: v for digests, _ in parts for k, v in digests.items()}
    unhashed = [name for name in parts[0][1] if name not in manifest]
    if unhashed:
        manifest.update(hash_files(tmp, unhashed))
    if _is_main():
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"files": manifest}, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()
    return path


def _load_matching(path: Path, state: dict, mine: str) -> None:
    """``dcp.load`` of ``state``, after its header shows the same algorithm and shape hyper-parameters."""
    header = {"header": ""}
    dcp.load(header, checkpoint_id=str(path))
    if header["header"] != mine:
        saved, want = json.loads(header["header"]), json.loads(mine)
        raise ValueError(
            f"checkpoint {path} holds optimizer {saved['algorithm']!r} with {saved['shape_hparams']}, but this "
            f"optimizer is {want['algorithm']!r} with {want['shape_hparams']}; build it with the checkpoint's "
            "algorithm and shape hyper-parameters (rank, side) to resume"
        )
    dcp.load(state, checkpoint_id=str(path))


def load(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> dict:
    """Load a checkpoint written by :func:`save`, on any world size; returns ``extra``.

    The optimizer must be built with the same algorithm and state-shaping hyper-parameters
    (rank, side); a mismatch is refused before any tensor is read. Every file's size and CRC-32 are
    checked first (collective): :class:`IntegrityError` names a missing, truncated or corrupted file.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete distopt checkpoint (no {COMPLETE_MARKER}): the save that wrote it did "
            "not finish. Resume from an earlier checkpoint."
        )
    manifest = read_manifest(path)
    if manifest is None:
        if _is_main():
            logger.warning("%s was written without file digests: its contents cannot be verified", path)
        manifest = {}
    _agree_on_sizes(path, manifest)
    optim_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": optim_state, "extra": dict(extra or {})}
    # The shards are CRC'd on a helper thread (no collective there) while DCP reads them into
    # ``state``; nothing reaches the model or the optimizer before every rank's share has passed.
    with ThreadPoolExecutor(1) as pool:
        checking = pool.submit(local_problems, path, manifest)
        try:
            _load_matching(path, state, _header(optim_state))
            failure = None
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - judged once the verification is in
            failure = err
        found = checking.result()
    raise_if_any([p for part in gather(found) for p in part])
    if failure is not None:
        raise failure
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]
