"""The coalesced shard collectives of ``core.comm``: the right blocks on every rank, uneven and empty
shards included, for a fixed number of ops whatever the world size."""

from __future__ import annotations

import pytest
import torch
from helpers import op_counter

from distopt.core import comm

from .harness import run_ranks

pytestmark = pytest.mark.distributed
# torch.chunk rows over 2 ranks: (7, 6) and (6, 5); over 4: (4, 4, 4, 1) and (3, 3, 3, 2): every shard
# but the first padded. One row: (1, 0) and (1, 0, 0, 0), empty shards.
COUNTED_ROWS, EMPTY_ROWS = (13, 11), (1,)
COLS = 6


def _counts(n: int, world_size: int) -> list[int]:
    """FSDP2's split of ``n`` rows: ``torch.chunk``'s, the last ranks short or empty."""
    sizes = [len(c) for c in torch.arange(n).chunk(world_size)]
    return sizes + [0] * (world_size - len(sizes))


def _worker(rank, world_size):
    out: dict = {"ops": {}}
    for rows_of in (COUNTED_ROWS, EMPTY_ROWS):
        # Two matrices of each shape (one class each), so that classes hold several members.
        wholes = [torch.randn(n, COLS, generator=torch.Generator().manual_seed(10 * n + j)) for n in rows_of for j in range(2)]
        row_counts = [_counts(w.shape[0], world_size) for w in wholes]

        def mine(w, counts, dim):
            return w.narrow(dim, sum(counts[:rank]), counts[rank]).contiguous()

        rows = [(mine(w, c, 0), c) for w, c in zip(wholes, row_counts)]
        cols = [(mine(w.T, c, 1), c) for w, c in zip(wholes, row_counts)]  # COLS x n, columns sharded
        partial = [(w.T * (rank + 1), c) for w, c in zip(wholes, row_counts)]  # each rank's partial sum
        total = world_size * (world_size + 1) / 2
        for kind, fn, requests, want in (
                ("rows", comm.all_gather_rows_coalesced, rows, wholes),
                ("cols", comm.all_gather_cols_coalesced, cols, [w.T for w in wholes]),
                ("scatter", comm.reduce_scatter_cols_coalesced, partial,
                 [mine(w.T * total, c, 1) for w, c in zip(wholes, row_counts)])):
            fn(requests, torch.distributed.group.WORLD)  # a step's layouts are the last step's: count the second
            with op_counter() as ops:
                got = fn(requests, torch.distributed.group.WORLD)
            if rows_of is COUNTED_ROWS:
                out["ops"][kind] = ops.count
            out[kind, rows_of] = all(g.shape == w.shape and torch.allclose(g, w) for g, w in zip(got, want))
    return out


def test_coalesced_shard_collectives_give_every_rank_its_blocks_in_ops_that_do_not_grow_with_ranks():
    """Rows, columns and reduce-scattered columns of uneven (and empty) shards, on 2 and 4 ranks: each
    rank gets the whole matrices (its columns of the sums), and the first rank (most rows, no padding)
    and the last (padded) dispatch the same number of ops on 2 ranks as on 4: no op per rank."""
    results = {ws: run_ranks(ws, _worker) for ws in (2, 4)}
    for ws, ranks in results.items():
        for rank, result in enumerate(ranks):
            assert all(value for key, value in result.items() if key != "ops"), (ws, rank, result)
    for position in (0, -1):
        assert results[2][position]["ops"] == results[4][position]["ops"], (position, results)
