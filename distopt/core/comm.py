"""Every collective distopt issues goes through this module.

With ``group=None`` (one process, DDP, or a whole-matrix owner) each function is a no-op on the
local tensor, so the single-process path runs the same code as the sharded one. Bytes sent are
counted per kind, which is what the traffic benchmark reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .batching import stacked

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# torch >= 2.10 renamed all_gather_into_tensor and reduce_scatter_tensor; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_bytes: Counter = Counter()
_calls: Counter = Counter()


def _record(kind: str, tensor: torch.Tensor) -> None:
    _bytes[kind] += tensor.numel() * tensor.element_size()
    _calls[kind] += 1


def traffic() -> dict[str, dict[str, int]]:
    """Bytes and calls per collective kind since the last :func:`reset_traffic`."""
    return {"bytes": dict(_bytes), "calls": dict(_calls)}


def reset_traffic() -> None:
    _bytes.clear()
    _calls.clear()


@contextmanager
def counting():
    """Context that resets the counters on entry and leaves them readable on exit."""
    reset_traffic()
    yield traffic


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``; returns it."""
    all_reduce_sum_async([(tensor, group)])()
    return tensor


def all_reduce_sum_async(requests: list[tuple[torch.Tensor, ProcessGroup | None]]) -> Callable[[], None]:
    """Start :func:`all_reduce_sum` of several ``(tensor, group)`` in place; call the result to wait."""
    works = []
    for tensor, group in requests:
        if group is not None and dist.get_world_size(group) > 1:
            _record("all_reduce", tensor)
            works.append(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True))

    def wait() -> None:
        for work in works:
            work.wait()

    return wait


def all_reduce_sum_coalesced(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Sum several tensors of one dtype over ``group`` with one all-reduce of their concatenation;
    returns the sums (views of one buffer), or the tensors themselves without a group."""
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return list(tensors)
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]), group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def replica_mean(tensor: torch.Tensor, group) -> torch.Tensor:
    """Average ``tensor`` in place over ``group``, the replicas of one matrix whose gradients are
    their own (projected sync); returns it. Counted apart, as ``replica_all_reduce``: it is the
    traffic that crosses nodes."""
    if group is not None and dist.get_world_size(group) > 1:
        replica_mean_future(tensor, group).wait()
    return tensor


def replica_mean_coalesced(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """:func:`replica_mean` of several fp32 tensors with one all-reduce of their concatenation."""
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return list(tensors)
    flat = replica_mean(torch.cat([t.reshape(-1) for t in tensors]), group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def replica_mean_future(tensor: torch.Tensor, group) -> torch.futures.Future:
    """Start :func:`replica_mean` of ``tensor``; the future gives it. Scaled before the sum by the
    reciprocal of the world size, as DDP's reducer scales (``x * (1/3)`` rounds unlike ``x / 3``), so
    an average over the same buffer has the very bits of DDP's."""
    _record("replica_all_reduce", tensor)
    tensor.mul_(1.0 / dist.get_world_size(group))
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()


def all_reduce_max(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        _record("all_reduce", tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def broadcast(tensor: torch.Tensor, src_rank: int, group) -> torch.Tensor:
    """Broadcast from ``src_rank`` (a rank inside ``group``) in place."""
    broadcast_async([(tensor, src_rank, group)])()
    return tensor


def all_gather_stacked(tensor: torch.Tensor, group) -> torch.Tensor:
    """Gather same-shaped tensors from every rank into a new leading dimension."""
    return all_gather_stacked_async([(tensor, group)])()[0]


def all_gather_stacked_async(requests: list[tuple[torch.Tensor, ProcessGroup | None]]) -> Callable[[], list[torch.Tensor]]:
    """Start :func:`all_gather_stacked` of several ``(tensor, group)``; the returned function waits
    and gives each result."""
    pending = []
    for tensor, group in requests:
        if group is None or dist.get_world_size(group) == 1:
            pending.append((None, tensor.unsqueeze(0)))
            continue
        size = dist.get_world_size(group)
        out = tensor.new_empty((size * tensor.numel(),))  # flat: gloo wants the inputs concatenated
        _record("all_gather", tensor)
        flat = tensor if tensor.dim() == 1 and tensor.is_contiguous() else tensor.contiguous().reshape(-1)
        work = _all_gather_single(out, flat, group=group, async_op=True)
        pending.append((work, out.view(size, *tensor.shape)))

    def wait() -> list[torch.Tensor]:
        for work, _ in pending:
            if work is not None:
                work.wait()
        return [out for _, out in pending]

    return wait


def all_gather_rows(local: torch.Tensor, row_counts: list[int], group) -> torch.Tensor:
    """Reassemble a row-sharded matrix whose rank ``i`` holds ``row_counts[i]`` rows."""
    return all_gather_rows_coalesced([(local, row_counts)], group)[0]


def _classes(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of the requests grouped by their keys, in first-seen order: same-shape requests are
    packed as one stacked block (a fixed number of copies per class, not per tensor). The keys must
    give the same classes on every rank, so that the wire layouts agree."""
    classes: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        classes.setdefault(key, []).append(i)
    return list(classes.values())


def all_gather_rows_coalesced(requests: list[tuple[torch.Tensor, list[int]]], group,
                              tags: Sequence[Hashable] | None = None) -> list[torch.Tensor]:
    """:func:`all_gather_rows` of several ``(local rows, row_counts)`` of one dtype over one group, in
    one collective: each rank sends its blocks, each padded to the matrix's largest count, back to back.
    Requests of one shape and layout (and ``tags``, the same on every rank, where given) come back as
    consecutive slices of one buffer, in their order (:func:`core.batching.stacked` reads them with no
    copy)."""
    return _gather_rows_by_class(requests, group, transposed=False, tags=tags)


def _gather_rows_by_class(requests: list[tuple[torch.Tensor, list[int]]], group, transposed: bool,
                          tags: Sequence[Hashable] | None = None) -> list[torch.Tensor]:
    """The rows gather of :func:`all_gather_rows_coalesced`; with ``transposed`` the requests hold
    ``(local columns, col_counts)`` and the columns (the last dimension) are gathered. A fixed number
    of ops per class of same-shape requests, whatever the world size: the class stacked (no copy where
    it is one buffer already), one gather, and one copy that puts each rank's block in place."""
    if not requests:
        return []
    if group is None or dist.get_world_size(group) == 1:
        return [local for local, _ in requests]
    # Everything but the gathered dimension, and the counts, are the same on every rank (the local
    # count is not). The wire carries each class as it is stacked, (J, rows, ...) or (J, ..., cols).
    others = (lambda t: tuple(t.shape[:-1])) if transposed else (lambda t: tuple(t.shape[1:]))
    gathered = -1 if transposed else 1  # the gathered dimension of a stacked class
    tags = tags if tags is not None else [None] * len(requests)
    classes = _classes([(others(t), tuple(counts), tag) for (t, counts), tag in zip(requests, tags)])
    blocks = []
    for members in classes:
        local = stacked([requests[i][0] for i in members])
        top = max(requests[members[0]][1])
        if local.shape[gathered] == top:  # this rank holds the most: nothing to pad
            blocks.append(local.view(-1))
            continue
        shape = list(local.shape)
        shape[gathered] = top
        padded = local.new_zeros(shape)
        padded.narrow(gathered, 0, local.shape[gathered]).copy_(local)
        blocks.append(padded.view(-1))
    received = all_gather_stacked(torch.cat(blocks) if len(blocks) > 1 else blocks[0], group)
    out: list[torch.Tensor] = [requests[0][0]] * len(requests)
    offset = 0
    for members, block in zip(classes, blocks):
        counts = requests[members[0]][1]
        rest = others(requests[members[0]][0])
        ranks, top, count = len(counts), max(counts), len(members)
        parts = received if len(blocks) == 1 else received[:, offset : offset + block.numel()]
        # (ranks, J, ...) -> rank blocks side by side along the gathered dimension, in one copy.
        if transposed:
            whole = parts.view(ranks, count, *rest, top).movedim(0, -2).reshape(count, *rest, ranks * top)
        else:
            whole = parts.view(ranks, count, top, *rest).transpose(0, 1).reshape(count, ranks * top, *rest)
        if min(counts) != top:  # the padding dropped
            whole = whole.index_select(gathered % whole.dim(), _unpadded_positions(tuple(counts), whole.device))
        for i, value in zip(members, whole.unbind(0)):
            out[i] = value
        offset += block.numel()
    return out


_positions: dict[tuple, torch.Tensor] = {}


def _unpadded_positions(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Where the real rows lie among ``len(counts)`` blocks of ``max(counts)`` rows, block ``i``
    holding ``counts[i]`` real rows first: the index that drops or places the padding in one op
    (made once per layout and device)."""
    key = (counts, device)
    index = _positions.get(key)
    if index is None:
        top = max(counts)
        index = torch.tensor([i * top + j for i, count in enumerate(counts) for j in range(count)], dtype=torch.long,
                             device=device)
        if len(_positions) >= 64:
            _positions.clear()
        _positions[key] = index
    return index


def reduce_scatter_cols(full: torch.Tensor, col_counts: list[int], group) -> torch.Tensor:
    """Sum ``full`` (``k x n``, one partial sum per rank) over ``group`` and keep this rank's columns:
    rank ``i`` gets the ``col_counts[i]`` columns after those of ranks ``0..i-1``. Half of an
    all-reduce's traffic; :func:`all_gather_cols` is the other half."""
    return reduce_scatter_cols_coalesced([(full, col_counts)], group)[0]


def reduce_scatter_cols_coalesced(requests: list[tuple[torch.Tensor, list[int]]], group) -> list[torch.Tensor]:
    """:func:`reduce_scatter_cols` of several ``(k x n partial sum, col_counts)`` of one dtype over one
    group, in one collective: rank ``i``'s segment holds its padded columns of every matrix."""
    if not requests:
        return []
    if group is None or dist.get_world_size(group) == 1:
        return [full for full, _ in requests]
    parts = len(requests[0][1])
    classes = _classes([(tuple(full.shape), tuple(counts)) for full, counts in requests])
    padded = []
    for members in classes:  # a fixed number of ops per class, whatever the world size
        fulls = stacked([requests[i][0] for i in members])  # (J, k, n): no copy where one buffer already
        counts = requests[members[0]][1]
        top = max(counts)
        if min(counts) != top:  # columns padded to parts * top, each rank's block zero-filled at its end
            spread = fulls.new_zeros((*fulls.shape[:2], parts * top))
            fulls = spread.index_copy_(2, _unpadded_positions(tuple(counts), fulls.device), fulls)
        # (J, k, parts, top) -> (parts, J, k, top): rank i's columns of every matrix in row i
        padded.append(fulls.view(*fulls.shape[:2], parts, top).permute(2, 0, 1, 3).reshape(parts, -1))
    send = torch.cat(padded, dim=1) if len(padded) > 1 else padded[0]  # (parts, segment): rank i's is row i
    out = send.new_empty((send.shape[1],))  # flat: gloo checks the first dimensions
    _record("reduce_scatter", send)
    _reduce_scatter_single(out, send.reshape(-1), group=group)
    rank, offset = dist.get_rank(group), 0
    results: list[torch.Tensor] = [requests[0][0]] * len(requests)
    for members, block in zip(classes, padded):
        full, counts = requests[members[0]]
        mine = (out if len(padded) == 1 else out[offset : offset + block.shape[1]]).view(len(members), full.shape[0], max(counts))
        if counts[rank] != max(counts):
            mine = mine[:, :, : counts[rank]].contiguous()
        for i, value in zip(members, mine.unbind(0)):
            results[i] = value
        offset += block.shape[1]
    return results


def all_gather_cols(local: torch.Tensor, col_counts: list[int], group) -> torch.Tensor:
    """Reassemble a column-sharded matrix whose rank ``i`` holds ``col_counts[i]`` columns."""
    return all_gather_cols_coalesced([(local, col_counts)], group)[0]


def all_gather_cols_coalesced(requests: list[tuple[torch.Tensor, list[int]]], group,
                              tags: Sequence[Hashable] | None = None) -> list[torch.Tensor]:
    """:func:`all_gather_cols` of several ``(local columns, col_counts)`` of one dtype over one group,
    in one collective: each class's column blocks sent as they lie, with no transposes, and the whole
    matrices of a class come back as consecutive slices of one buffer, as the rows gather's do."""
    return _gather_rows_by_class(requests, group, transposed=True, tags=tags)


def gather_rows(local: torch.Tensor, row_counts: list[int], dst_rank: int, group) -> torch.Tensor | None:
    """Reassemble a row-sharded matrix on ``dst_rank`` only (``None`` elsewhere)."""
    return gather_rows_async([(local, row_counts, dst_rank, group)])()[0]


def gather_rows_async(requests: list[tuple[torch.Tensor, list[int], int, ProcessGroup | None]]) -> Callable[[], list[torch.Tensor | None]]:
    """Start :func:`gather_rows` for several ``(local, row_counts, dst_rank, group)``; the returned
    function waits and gives each result. Each destination receives while the others send."""
    pending: list[tuple[dist.Work | None, list[torch.Tensor] | None, list[int] | None]] = []
    out: list[torch.Tensor | None] = []
    for local, row_counts, dst_rank, group in requests:
        if group is None or dist.get_world_size(group) == 1:
            pending.append((None, None, None))
            out.append(local)
            continue
        padded = local.new_zeros((max(row_counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        mine = dist.get_rank(group) == dst_rank
        buffers = [torch.empty_like(padded) for _ in row_counts] if mine else None
        _record("gather", padded)
        work = dist.gather(padded, buffers, dst=dist.get_global_rank(group, dst_rank), group=group, async_op=True)
        pending.append((work, buffers, row_counts))
        out.append(None)

    def wait() -> list[torch.Tensor | None]:
        for i, (work, buffers, row_counts) in enumerate(pending):
            if work is not None:
                work.wait()
                if buffers is not None:
                    assert row_counts is not None  # set together with the buffers
                    out[i] = torch.cat([b[:count] for b, count in zip(buffers, row_counts)], dim=0)
        return out

    return wait


def broadcast_async(requests: list[tuple[torch.Tensor, int, ProcessGroup | None]]) -> Callable[[], None]:
    """Start :func:`broadcast` of several ``(tensor, src_rank, group)`` in place; call the result to wait."""
    works = []
    for tensor, src_rank, group in requests:
        if group is not None and dist.get_world_size(group) > 1:
            if not tensor.is_contiguous():  # gloo would send the raw storage, in another order
                raise ValueError(f"broadcast needs a contiguous tensor (shape {tuple(tensor.shape)}); call .contiguous() first")
            _record("broadcast", tensor)
            works.append(dist.broadcast(tensor, src=dist.get_global_rank(group, src_rank), group=group, async_op=True))

    def wait() -> None:
        for work in works:
            work.wait()

    return wait
