"""The matrix-shard view every algorithm is written against.

A view says which rows of a global ``m x n`` matrix this rank holds and which process group holds
the rest. Algorithms take every decision (rank, side, seeds, refresh phase) from ``name`` and
``global_shape``, never from the local tensor, so 1, 2 or 3 ranks compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MatrixShardView:
    name: str
    global_shape: tuple[int, int]
    row_start: int = 0
    row_end: int | None = None
    group: object = None  # torch.distributed.ProcessGroup, or None when the rows are all here
    row_counts: tuple[int, ...] = field(default=())  # rows held by each rank of ``group``

    def __post_init__(self):
        if len(self.global_shape) != 2:
            raise ValueError(f"{self.name}: a matrix view needs a 2-D global shape, got {self.global_shape}")
        if self.row_end is None:
            object.__setattr__(self, "row_end", self.global_shape[0])
        if not self.row_counts:
            object.__setattr__(self, "row_counts", (self.global_shape[0],))
        if not 0 <= self.row_start <= self.row_end <= self.global_shape[0]:
            raise ValueError(f"{self.name}: rows [{self.row_start}, {self.row_end}) lie outside {self.global_shape}")

    @property
    def m(self) -> int:
        return self.global_shape[0]

    @property
    def n(self) -> int:
        return self.global_shape[1]

    @property
    def local_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def sharded(self) -> bool:
        return self.group is not None


def whole_matrix_view(name: str, tensor: torch.Tensor) -> MatrixShardView:
    """View of a matrix held entirely by this process (single process, DDP, ZeRO/OSS owners)."""
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(tensor.shape)}")
    return MatrixShardView(name=name, global_shape=(tensor.shape[0], tensor.shape[1]))
