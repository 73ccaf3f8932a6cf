"""Training data: token streams, the embedded default corpus, and a resumable sampler.

Sources
- ``stdlib``: the ``.py`` files of the running Python's standard library (found through
  ``sysconfig``), present on every machine that runs Python; nothing is downloaded.
- text: one file, or a folder read through a glob (``**/*.txt`` by default).
- ``.bin`` token shards: uint16 tokens, either raw (nanoGPT) or behind the 256-int32 header of
  llm.c / modded-nanogpt (magic 20240520). Memory-mapped, never loaded whole.

Train and validation files are split by a hash of the file's path relative to the source root,
so the split is the same on every rank and every machine, and stays put as files are added.

Batches are a pure function of (seed, sample index): the sampler walks windows of
``seq_len + 1`` tokens in a seeded permutation per epoch, and its only state is the number of
samples consumed. Resuming at step ``s`` continues with exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# -- tokenizers ------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes are the tokens (256 ids). Id 0 (NUL, absent from text) separates documents."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (``local_files_only``, no download)."""

    def __init__(self, folder: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise RuntimeError("data.tokenizer is a folder, which needs transformers: pip install 'distopt[hf]'") from err
        self.folder = str(folder)
        self.name = f"hf:{Path(folder).resolve()}"
        self.tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        self.eos_id = int(eos) if eos is not None else 0
        if self.vocab_size > 65536:
            raise ValueError(f"tokenizer {folder} has {self.vocab_size} ids; token files are uint16 (at most 65536)")

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        ids = self.tok(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.uint16)

    def decode(self, ids) -> str:
        return cast(str, self.tok.decode([int(i) for i in ids]))  # one sequence of ids: one string


def build_tokenizer(spec: str):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


# -- finding files -----------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def name_hash_percent(relative: str) -> float:
    """A stable number in [0, 100) from a relative path (forward slashes)."""
    digest = hashlib.sha1(relative.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100.0


def _list_files(spec: str, pattern: str) -> tuple[Path, list[Path]]:
    """(root, sorted files) for a file, folder or glob."""
    path = Path(spec)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file() and not (EXCLUDED_DIRS & set(p.relative_to(path).parts)))
        return path, files
    files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    return root, files


def _stdlib_files(pattern: str) -> tuple[Path, list[Path]]:
    root = stdlib_root()
    return root, sorted(p for p in root.glob(pattern or "**/*.py") if p.is_file() and not (EXCLUDED_DIRS & set(p.relative_to(root).parts)))


@dataclass
class SourceFiles:
    kind: str  # "text" or "bin"
    root: Path
    train: list[Path]
    val: list[Path]
    val_from_tail: bool = False  # one file only: the validation set is its last val_percent of tokens


def resolve_source(source: str, pattern: str, val_source: str, val_percent: float) -> SourceFiles:
    if source == "stdlib":
        root, files = _stdlib_files(pattern)
    else:
        is_bin = source.endswith(".bin") or (Path(source).is_dir() and any(Path(source).glob(pattern or "*.bin")) and not pattern.endswith(".txt"))
        default = "*.bin" if is_bin else "**/*.txt"
        root, files = _list_files(source, pattern or default)
    if not files:
        raise ValueError(f"data.source={source!r} (glob {pattern or 'default'!r}): no files found")
    bins = [f for f in files if f.suffix == ".bin"]
    if bins and len(bins) != len(files):
        raise ValueError(f"data.source={source!r} mixes .bin token shards and text files; point it at one kind")
    kind = "bin" if bins else "text"
    if val_source:
        _, vfiles = _stdlib_files(pattern) if val_source == "stdlib" else _list_files(val_source, pattern or ("*.bin" if kind == "bin" else "**/*.txt"))
        if not vfiles:
            raise ValueError(f"data.val_source={val_source!r}: no files found")
        return SourceFiles(kind, root, files, vfiles)
    if kind == "bin":
        named_val = [f for f in files if "val" in f.name.lower()]
        if named_val and len(named_val) < len(files):  # train.bin/val.bin, fineweb_val_*.bin
            return SourceFiles(kind, root, [f for f in files if f not in named_val], named_val)
    if len(files) == 1:
        return SourceFiles(kind, root, files, files, val_from_tail=True)
    train: list[Path]
    val: list[Path]
    train, val = [], []
    for f in files:
        (val if name_hash_percent(str(f.relative_to(root))) < val_percent else train).append(f)
    if not val:  # few files: hold out the one with the smallest hash
        f = min(files, key=lambda p: name_hash_percent(str(p.relative_to(root))))
        train.remove(f)
        val.append(f)
    if not train:
        raise ValueError(f"data.source={source!r}: every file fell into validation; lower data.val_percent")
    return SourceFiles(kind, root, train, val)


# -- token arrays -----------------------------------------------------------------------------------
def open_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = np.frombuffer(fh.read(LLMC_HEADER_BYTES), dtype=np.int32) if size >= LLMC_HEADER_BYTES else np.zeros(0, np.int32)
    if head.size and int(head[0]) == LLMC_MAGIC:
        count = int(head[2])
        if LLMC_HEADER_BYTES + 2 * count > size:
            raise ValueError(f"{path}: header says {count} tokens but the file holds fewer")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES, shape=(count,))
    if size % 2:
        raise ValueError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _read_text_tokens(files: list[Path], tokenizer) -> np.ndarray:
    parts = []
    sep = np.asarray([tokenizer.eos_id], dtype=np.uint16)
    for f in files:
        parts.append(tokenizer.encode_bytes(f.read_bytes()))
        parts.append(sep)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def text_tokens(files: list[Path], tokenizer, cache_dir: str = "") -> np.ndarray:
    """Token ids of ``files`` joined by the tokenizer's separator. Byte tokens are computed on the
    fly (fast); other tokenizers' output is cached as a .bin keyed by file list, sizes and tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return _read_text_tokens(files, tokenizer)
    key = hashlib.sha1(json.dumps([tokenizer.name] + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()).hexdigest()[:16]
    folder = Path(cache_dir or os.environ.get("DISTOPT_CACHE", Path.home() / ".cache" / "distopt")) / "tokens"
    path = folder / f"{key}.bin"
    if path.is_file():
        return open_bin(path)
    ids = _read_text_tokens(files, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    ids.tofile(tmp)
    os.replace(tmp, path)
    return ids


class TokenStream:
    """Fixed windows of ``seq_len + 1`` tokens over one or more token arrays (no window crosses
    an array boundary). Window ``i`` of an array starts at ``i * seq_len``."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, what: str):
        self.arrays = [a for a in arrays if len(a) > seq_len]
        self.seq_len = seq_len
        counts = [(len(a) - 1) // seq_len for a in self.arrays]
        self.offsets = np.cumsum([0] + counts)
        self.num_windows = int(self.offsets[-1])
        self.num_tokens = int(sum(len(a) for a in arrays))
        if self.num_windows == 0:
            raise ValueError(f"{what}: {self.num_tokens} tokens is less than one sequence of data.seq_len={seq_len} + 1")

    def window(self, index: int) -> np.ndarray:
        index %= self.num_windows
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[which])) * self.seq_len
        return np.asarray(self.arrays[which][start : start + self.seq_len + 1], dtype=np.int64)

    def max_token(self, limit: int = 1 << 20) -> int:
        return int(max(int(np.max(a[:limit])) for a in self.arrays))


class Sampler:
    """Sample ``k`` of the run is window ``perm_e[k mod W]`` of epoch ``e = k // W``, where
    ``perm_e`` is a permutation seeded by (seed, e). Stateless apart from the caller's counter."""

    def __init__(self, stream: TokenStream, seed: int):
        self.stream = stream
        self.seed = seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.stream.num_windows, generator=g)
            self._epoch = epoch
        return cast(torch.Tensor, self._perm)  # drawn for self._epoch

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Samples ``first .. first + count - 1`` as a ``count x (seq_len + 1)`` int64 tensor."""
        rows = []
        w = self.stream.num_windows
        for k in range(first, first + count):
            rows.append(self.stream.window(int(self._permutation(k // w)[k % w])))
        return torch.from_numpy(np.stack(rows))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


@dataclass
class Datasets:
    train: TokenStream
    val: TokenStream
    description: str


def load_datasets(cfg, tokenizer) -> Datasets:
    """Open the train and validation streams described by ``cfg.data``."""
    data = cfg.data
    files = resolve_source(data.source, data.glob, data.val_source, data.val_percent)
    if files.kind == "bin":
        train_arrays = [open_bin(f) for f in files.train]
        val_arrays = [open_bin(f) for f in files.val]
    else:
        train_arrays = [text_tokens(files.train, tokenizer, data.cache_dir)]
        val_arrays = [text_tokens(files.val, tokenizer, data.cache_dir)] if files.val != files.train else train_arrays
    if files.val_from_tail:
        whole = train_arrays[0]
        cut = max(len(whole) - max(int(len(whole) * data.val_percent / 100), data.seq_len + 1), 0)
        train_arrays, val_arrays = [whole[:cut]], [whole[cut:]]
    train = TokenStream(train_arrays, data.seq_len, "training data")
    val = TokenStream(val_arrays, data.seq_len, "validation data")
    where = "Python standard library source" if data.source == "stdlib" else data.source
    description = (
        f"{where} ({files.kind}, {len(files.train)} train / {len(files.val)} val files): "
        f"{_count(train.num_tokens)} train tokens, {_count(val.num_tokens)} val tokens"
    )
    return Datasets(train, val, description)
