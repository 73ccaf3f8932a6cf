"""Where a ZeRO partition of one parameter lies: its flat range, the rows it owns and the
boundary exchange plan (see the package docstring, steps 1-2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...core.shard import MatrixShardView

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Layout of one parameter's partitions
# ---------------------------------------------------------------------------------------------------
@dataclass
class Partition:
    """Where one parameter's elements lie across the data-parallel ranks, and this rank's share."""

    name: str
    param: torch.Tensor  # the model parameter: the optimizer's state key
    kind: str  # "matrix" or "adamw"
    shape: tuple[int, ...]
    length: int  # elements per rank's partition (S), padding included
    rank: int
    world: int
    group: ProcessGroup | None  # data-parallel process group, None when one rank holds everything
    device: torch.device
    source: tuple[int, Any] | None = None  # (stage, index) of DeepSpeed's buffers holding the fp32 partition

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def bounds(self, k: int) -> tuple[int, int]:
        """Flat range ``[start, end)`` of rank ``k``."""
        start = min(k * self.length, self.numel)
        return start, min(start + self.length, self.numel)

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]

    @property
    def end(self) -> int:
        return self.bounds(self.rank)[1]

    # -- rows (matrices only) ---------------------------------------------------------------------
    def rows(self, k: int) -> tuple[int, int]:
        """Rows owned by rank ``k``: those whose first element it holds."""
        m, n = self.shape
        start, end = self.bounds(k)
        return min(m, _ceil_div(start, n)), min(m, _ceil_div(end, n))

    def head(self, k: int) -> int:
        """Elements at the start of rank ``k``'s range that belong to an earlier rank's last row."""
        n = self.shape[1]
        start, end = self.bounds(k)
        return max(0, min(end, self.rows(k)[0] * n) - start)

    def tail(self, k: int) -> int:
        """Elements of rank ``k``'s last row held by later ranks."""
        r0, r1 = self.rows(k)
        return r1 * self.shape[1] - self.bounds(k)[1] if r1 > r0 else 0

    def owner_of_head(self, k: int) -> int:
        row = self.rows(k)[0] - 1
        return next(j for j in range(self.world) if self.rows(j)[0] <= row < self.rows(j)[1])

    def describe(self) -> dict:
        out = {"kind": self.kind, "shape": list(self.shape), "start": self.start, "end": self.end}
        if self.kind == "matrix":
            out["rows"] = list(self.rows(self.rank))
        return out


@dataclass
class _Plan:
    """Precomputed exchange of one matrix (identical on every rank)."""

    view: MatrixShardView
    head: int  # this rank's head fragment
    own: int  # elements of this rank's rows it holds itself
    tail: int  # elements of its last row held by later ranks
    sources: list[tuple[int, int]]  # (rank, count) filling this rank's tail, in order
    head_owner: int  # rank owning this rank's head fragment (when head > 0)
    head_offset: int  # where that fragment starts in the owner's tail
    max_head: int
    max_tail: int


def _plan(part: Partition, owner: int) -> _Plan:
    m, n = part.shape
    k, world = part.rank, part.world
    r0, r1 = part.rows(k)
    counts = tuple(part.rows(j)[1] - part.rows(j)[0] for j in range(world))
    view = MatrixShardView(name=part.name, global_shape=(m, n), row_start=r0, row_end=r1,
                           group=part.group if world > 1 else None, row_counts=counts, owner=owner,
                           index=k if world > 1 else 0)
    head = part.head(k)
    own = (min(part.end, r1 * n) - r0 * n) if r1 > r0 else 0
    tail = part.tail(k)
    sources = [(i, part.head(i)) for i in range(k + 1, world)
               if part.head(i) > 0 and r1 > r0 and part.owner_of_head(i) == k]
    if sum(c for _, c in sources) != tail:
        raise RuntimeError(f"{part.name}: partition layout does not tile rows (tail {tail}, sources {sources})")
    head_owner, head_offset = (part.owner_of_head(k), part.start - part.bounds(part.owner_of_head(k))[1]) if head else (0, 0)
    max_head = max(part.head(j) for j in range(world))
    max_tail = max(part.tail(j) for j in range(world))
    return _Plan(view, head, own, tail, sources, head_owner, head_offset, max_head, max_tail)


