"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), resumable on another world size.

The optimizer's state dict is keyed by parameter name; under FSDP2 its row-sharded tensors are
DTensors with the parameter's placement, so DCP writes each rank's rows once and reads back exactly
the rows a new layout needs (2 ranks -> 3 ranks -> 1 process). Replicated tensors are written once.

A checkpoint is written into ``<path>.tmp`` and renamed to ``<path>`` only after every rank has
finished, so a save killed midway never leaves a directory that loads as valid. The completion
marker lists every file with its size and digest (hashed as written, or by all ranks, each a share);
:func:`load` checks them all before reading a tensor, so a truncated or corrupted checkpoint raises
:class:`IntegrityError` naming the file instead of loading garbage. The same helpers serve the
training job's checkpoints (``distopt/job/checkpoint.py``).

One module of about 570 lines because saving, the integrity record and loading share the file
layout and the digest format; split, each half would have to restate them.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import sys
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .optim.base import SubspaceOptimizer

if TYPE_CHECKING:
    import io

try:
    import xxhash
except ImportError:  # installed without its dependencies: block digests fall back to CRC-32
    xxhash = None  # type: ignore[assignment]  # an optional dependency: checked for None where used

COMPLETE_MARKER = ".distopt-complete"
logger = logging.getLogger("distopt")


# -- integrity: sizes and digests of every file --------------------------------------------------------
class IntegrityError(ValueError):
    """A checkpoint file is missing, has the wrong size, or its digest differs from the manifest."""


def save_file(obj, path: Path) -> dict:
    """``torch.save`` with fsync; returns the file's digest (:func:`file_digest`)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return file_digest(path)


def file_digest(path: Path) -> dict:
    """Size and digest of ``path``. A ``torch.save`` file is a zip whose index already holds a
    CRC-32 of every record (computed by ``torch.save`` as it wrote them): its digest is the CRC of
    that index, read from the end of the file, so saving costs nothing more; :func:`check` then
    checks every record against it. Any other file gets a block digest (:func:`_block_digest`)."""
    path = Path(path)
    index = _whole_zip_index(path)
    if index is not None:
        return {"bytes": path.stat().st_size, "zip_index": f"{index:08x}"}
    size = path.stat().st_size
    kind = block_kind()
    return {"bytes": size, kind: _block_digest(path, size, kind)}


# A file that is not a torch.save zip is hashed in independent 64 MiB blocks, so that blocks can be
# hashed on several threads, and streamed as they are written. XXH3-64 runs at memory speed (about
# 2.5x zlib's CRC-32 here), which keeps verification beside a DCP load under 5% of the load;
# CRC-32 serves where xxhash is not installed, and verifies checkpoints written with it.
BLOCK = 1 << 26
BLOCK_KINDS = ("block_xxh3", "block_crc32")
THREADS = max(1, min(8, os.cpu_count() or 1))


def block_kind() -> str:
    """The block digest new checkpoints use: ``block_xxh3``, or ``block_crc32`` without xxhash."""
    return "block_xxh3" if xxhash is not None else "block_crc32"


class _BlockHash:
    """The running hash of one block."""

    def __init__(self, kind: str):
        if kind == "block_xxh3" and xxhash is None:
            raise ImportError("this checkpoint's files carry XXH3 digests; `pip install xxhash` to verify them")
        self._xxh = xxhash.xxh3_64() if kind == "block_xxh3" else None
        self._crc = 0

    def update(self, data) -> None:
        if self._xxh is not None:
            self._xxh.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        return self._xxh.intdigest() if self._xxh is not None else self._crc


def _combine(kind: str, blocks: list[int]) -> str:
    """The file's digest: the hash of its blocks' digests."""
    if kind == "block_xxh3":
        return f"{xxhash.xxh3_64_intdigest(b''.join(v.to_bytes(8, 'little') for v in blocks)):016x}"
    return f"{zlib.crc32(b''.join(v.to_bytes(4, 'little') for v in blocks)):08x}"


def _block_digest(path: Path, size: int, kind: str, chunk: int = 1 << 24) -> str:
    """``kind`` digest of the first ``size`` bytes of ``path``, block by block on up to
    :data:`THREADS` threads. The file is memory-mapped, so hashing copies nothing, and a DCP load
    running beside it reads the same page-cache pages (read() serves where mmap fails)."""
    blocks = max(1, -(-size // BLOCK))

    def hashed(data) -> int:
        h = _BlockHash(kind)
        h.update(data)
        return h.value()

    with open(path, "rb") as fh, _mapped(fh) as view:
        if view is not None and size:
            with ThreadPoolExecutor(min(THREADS, blocks)) as pool:
                digests = list(pool.map(lambda i: hashed(view[i * BLOCK:min(size, (i + 1) * BLOCK)]), range(blocks)))
            return _combine(kind, digests)

    def read_block(index: int) -> int:
        h, left = _BlockHash(kind), min(BLOCK, size - index * BLOCK)
        with open(path, "rb") as fh:
            fh.seek(index * BLOCK)
            while left > 0 and (data := fh.read(min(chunk, left))):
                h.update(data)
                left -= len(data)
        return h.value()

    with ThreadPoolExecutor(min(THREADS, blocks)) as pool:
        return _combine(kind, list(pool.map(read_block, range(blocks))))


PARALLEL_HASH_BYTES = 1 << 20  # writes at least this large are hashed beside the write
_HASH_POOL = None


def _hash_pool() -> ThreadPoolExecutor:
    global _HASH_POOL
    if _HASH_POOL is None:
        _HASH_POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="distopt-hash")
    return _HASH_POOL


class _BlockHashWriter:
    """A write-only stream that hashes what passes through it in :data:`BLOCK`-sized blocks, as
    :func:`_block_digest` would read them back, and reports ``(bytes, digest)`` when closed."""

    def __init__(self, raw, kind: str, on_close):
        self._raw, self._kind, self._on_close = raw, kind, on_close
        self._blocks: list[int] = []
        self._hash, self._fill, self._size = _BlockHash(kind), 0, 0
        self._done = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= PARALLEL_HASH_BYTES:
            # The hash and the file write both release the GIL: hash on a helper thread while the
            # bytes are written, and return only once both are done (the caller may reuse its buffer).
            hashing = _hash_pool().submit(self._update, view)
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
            self._update(view[:written])
        self._size += written
        return written

    def _update(self, view: memoryview) -> None:
        while view:
            take = min(len(view), BLOCK - self._fill)
            self._hash.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == BLOCK:
                self._blocks.append(self._hash.value())
                self._hash, self._fill = _BlockHash(self._kind), 0

    def close(self) -> None:
        if not self._done:
            self._done = True
            if self._fill or not self._blocks:
                self._blocks.append(self._hash.value())
            self._on_close(self._size, _combine(self._kind, self._blocks))
        self._raw.close()

    def __getattr__(self, name):  # tell, flush, fileno, ... of the real file
        return getattr(self._raw, name)


def hashing_writer(folder: Path):
    """A DCP ``FileSystemWriter`` into ``folder`` that hashes every file as it writes it: no file is
    read back. Its ``digests`` holds ``{file name: digest}`` of the files this rank wrote."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        def __init__(self):
            super().__init__()
            self.digests: dict[str, dict] = {}
            self._lock = threading.Lock()

        @contextmanager
        def create_stream(self, path, mode):
            stream: io.IOBase | _BlockHashWriter  # the base class's, or a hashing one when writing
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            name = Path(path).name

            kind = block_kind()

            def record(size: int, digest: str) -> None:
                with self._lock:
                    self.digests[name] = {"bytes": size, kind: digest}

            with open(path, mode) as raw:
                stream = _BlockHashWriter(raw, kind, record)
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
    its index (a ``torch.save`` file), else None: a file that merely contains a zip is hashed whole."""
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
    with open(path, "rb") as fh, _mapped(fh) as view:
        for info in records:
            start = _data_start(fh, info)
            if start is None or info.compress_type != zipfile.ZIP_STORED:
                return info.filename
            if view is not None:
                data = view[start:start + info.compress_size]
                bad = len(data) != info.compress_size or zlib.crc32(data) != info.CRC
                data.release()
                if bad:
                    return info.filename
                continue
            fh.seek(start)
            crc, left = 0, info.compress_size
            while left > 0:
                block = fh.read(min(chunk, left))
                if not block:
                    return info.filename
                crc, left = zlib.crc32(block, crc), left - len(block)
            if crc != info.CRC:
                return info.filename
    return None


@contextmanager
def _mapped(fh):
    """A read-only memoryview of the open file ``fh`` (hashing it then copies nothing), or None where
    the file is empty or its filesystem cannot map it."""
    try:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        yield None
        return
    view = memoryview(mapped)
    try:
        yield view
    finally:
        view.release()
        mapped.close()


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
    kind = next((k for k in BLOCK_KINDS if k in want), None)
    if kind is None:
        return f"{path.name} has no digest this version knows ({sorted(want)}); upgrade distopt to verify it"
    if _block_digest(path, want["bytes"], kind) != want[kind]:
        return f"{path.name} is corrupted (its {kind[len('block_'):].upper()} block digest differs from the one written)"
    return None


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
    """Every file of ``manifest`` exists with its size and digest (collective: each rank reads a
    round-robin share). Raises :class:`IntegrityError` naming the first bad file, on every rank."""
    _agree_on_sizes(folder, manifest)
    raise_if_any([p for part in gather(local_problems(folder, manifest)) for p in part])


def local_problems(folder: Path, manifest: dict) -> list[str]:
    """This rank's round-robin share of :func:`verify_files`, with no collective: it can run on a
    helper thread beside a load, at a lower CPU priority. Returns what is wrong."""
    _yield_to_the_load()
    found = _on_my_share(lambda n: check(Path(folder) / n, manifest[n]), sorted(manifest))
    return [f"{folder}: {p}" for p in found.values() if p]


def _yield_to_the_load() -> None:
    """On a helper thread (Linux), lower this thread's CPU priority, and that of the threads it
    starts: hashing then takes the cycles a load beside it leaves free rather than slowing it."""
    if threading.current_thread() is threading.main_thread() or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except OSError:
        pass


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
    # Each rank hashed the files it wrote as it wrote them; anything else is read back. Rank 0's listing,
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
    (rank, side); a mismatch is refused before any tensor is read. Every file's size and digest are
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
    # The shards are hashed on a helper thread (no collective there) while DCP reads them into
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
