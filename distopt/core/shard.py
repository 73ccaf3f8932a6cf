"""The matrix-shard view every algorithm is written against.

A view says which rows of a global ``m x n`` matrix this rank holds and which process group holds
the rest. Algorithms take every decision (rank, side, seeds, refresh phase) from ``name`` and
``global_shape``, never from the local tensor, so 1, 2 or 3 ranks compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class MatrixShardView:
    name: str
    global_shape: tuple[int, int]
    row_start: int = 0
    row_end: int | None = None
    group: ProcessGroup | None = None  # None when the rows are all here
    row_counts: tuple[int, ...] = field(default=())  # rows held by each rank of ``group``
    mesh: DeviceMesh | None = None  # of a DTensor parameter, to wrap row-sharded state for DCP
    placements: tuple = ()
    owner: int = 0  # rank in ``group`` that does this matrix's whole-matrix work (exact SVD)
    # This rank's position in ``group`` (and in ``row_counts``); found from ``row_start`` when not given.
    index: int | None = None
    # Ranks holding these same rows whose gradients are their own, not yet averaged (projected sync
    # under DDP or HSDP): the optimizer averages each linear map of G over them. None: G is averaged.
    replicas: ProcessGroup | None = None

    def __post_init__(self):
        if len(self.global_shape) != 2:
            raise ValueError(f"{self.name}: a matrix view needs a 2-D global shape, got {self.global_shape}")
        if self.row_end is None:
            object.__setattr__(self, "row_end", self.global_shape[0])
        if not self.row_counts:
            object.__setattr__(self, "row_counts", (self.global_shape[0],))
        assert self.row_end is not None  # filled in just above
        if not 0 <= self.row_start <= self.row_end <= self.global_shape[0]:
            raise ValueError(f"{self.name}: rows [{self.row_start}, {self.row_end}) lie outside {self.global_shape}")
        if not self.sharded:
            object.__setattr__(self, "index", 0)
            return
        starts = [sum(self.row_counts[:i]) for i in range(len(self.row_counts))]
        if self.index is None:
            found = [i for i, s in enumerate(starts) if s == self.row_start and self.row_counts[i] == self.local_rows]
            object.__setattr__(self, "index", found[0] if found else 0)
        assert self.index is not None  # given, or found just above
        if not (0 <= self.index < len(self.row_counts) and starts[self.index] == self.row_start
                and self.row_counts[self.index] == self.local_rows):
            raise ValueError(f"{self.name}: rows [{self.row_start}, {self.row_end}) are not block {self.index} of {self.row_counts}")

    @property
    def m(self) -> int:
        return self.global_shape[0]

    @property
    def n(self) -> int:
        return self.global_shape[1]

    @property
    def local_rows(self) -> int:
        assert self.row_end is not None  # __post_init__ fills it in
        return self.row_end - self.row_start

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def parts(self) -> int:
        """Ranks the matrix is split over (1 when it is all here)."""
        return len(self.row_counts) if self.sharded else 1

    def chunk_counts(self, length: int) -> list[int]:
        """Entries per rank when ``length`` entries (the rows of a right basis, the columns of a
        left-side moment) are split over the shard group like ``torch.chunk``."""
        return list(chunk_rows(length, self.parts))

    def chunk(self, length: int) -> tuple[int, int]:
        """``[start, end)`` of this rank's share of :meth:`chunk_counts`."""
        counts = self.chunk_counts(length)
        assert self.index is not None  # __post_init__ fills it in
        return sum(counts[: self.index]), sum(counts[: self.index + 1])


def whole_matrix_view(name: str, tensor: torch.Tensor) -> MatrixShardView:
    """View of a matrix held entirely by this process (single process, DDP, ZeRO/OSS owners)."""
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(tensor.shape)}")
    return MatrixShardView(name=name, global_shape=(tensor.shape[0], tensor.shape[1]))


def is_dtensor(tensor) -> TypeGuard[DTensor]:
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "device_mesh")


def local(tensor):
    """This rank's part of a DTensor (sharing its storage), or the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def locals_of(tensors: list) -> list:
    """``[local(t) for t in tensors]``, with no Python call per tensor when all are plain tensors
    (the common case, checked by type in one pass)."""
    if _PLAIN_TYPES.issuperset(map(type, tensors)):
        return list(tensors)
    return [local(t) for t in tensors]


def chunk_rows(m: int, parts: int) -> tuple[int, ...]:
    """Rows per rank when ``m`` rows are split like ``torch.chunk`` (FSDP2's ``Shard(0)``)."""
    size = -(-m // parts) if m else 0
    return tuple(max(0, min(size, m - i * size)) for i in range(parts))


def dtensor_view(name: str, tensor) -> MatrixShardView:
    """View of a DTensor matrix sharded by rows: ``Shard(0)`` on a 1-D mesh (FSDP2), or
    ``(Replicate(), Shard(0))`` on a 2-D mesh (HSDP). Replicated mesh dimensions need no optimizer
    communication, since gradients are already averaged over them."""
    from torch.distributed.tensor import Replicate, Shard

    shape = tuple(tensor.shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D DTensor, got global shape {shape}")
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    others = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
        raise ValueError(
            f"{name}: DTensor placements {placements} are not supported. distopt handles Shard(0) row "
            "shards on one mesh dimension (FSDP2 fully_shard, or HSDP with (Replicate(), Shard(0))); "
            "use fully_shard's default dim-0 sharding, without tensor parallelism on this weight."
        )
    if not shard_dims:
        return MatrixShardView(name=name, global_shape=shape)
    mesh_dim = shard_dims[0]
    group = mesh.get_group(mesh_dim)
    counts = chunk_rows(shape[0], mesh.size(mesh_dim))
    me = mesh.get_local_rank(mesh_dim)
    start = sum(counts[:me])
    return MatrixShardView(name=name, global_shape=shape, row_start=start, row_end=start + counts[me],
                           group=group, row_counts=counts, mesh=mesh, placements=placements, index=me)


def lpt_owners(costs: Mapping[str, float], ranks: int) -> dict[str, int]:
    """Longest-processing-time assignment of named jobs to ranks: biggest first, to the least
    loaded rank. Sorted by (cost, name), so every rank computes the same answer."""
    load = [0.0] * ranks
    owners = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners
