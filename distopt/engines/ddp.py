"""Projected gradient sync under ``torch.nn.parallel.DistributedDataParallel``.

DDP all-reduces every gradient, ``m n`` values per matrix per step. A projected algorithm uses the
averaged gradient ``G = mean_i G_i`` only through linear maps (``P^T G`` or ``G Q`` each step, the
sketches ``G X`` and ``G^T Y`` at a randomized refresh), and a linear map of the average is the
average of the maps. So :func:`sync_by_projection` leaves the matrices out of DDP's all-reduce and
lets the optimizer average those maps instead: ``r`` values per row or column, the same numbers as
the full sync to float rounding, identical on every replica (no drift, no special checkpoint
step). An exact ``svd`` refresh needs the whole averaged gradient of the refreshing matrix: at
its refresh step DDP's bucket holding it is all-reduced in full, as without the hook. Everything
else (the element-wise group: norms, embeddings, biases) is still all-reduced by DDP, through the
same communication hook.

What cannot be had from projections is refused when the sync is set up, never approximated: Fira's
recovery scaling, SubTrack's tracking step, and the algorithms with a full-size second moment or
residual (``snsm``, ``sam``, ``adam-mini``, ``adapm``, ``adapm-mini``, ``rso``).

Gradient clipping: ``torch.nn.utils.clip_grad_norm_`` would measure each replica's own gradient of
the synced matrices and clip the replicas differently. Use the optimizer's ``clip_grad_norm_``,
which measures the projections as the step uses them (see ``docs/engines.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import comm


@dataclass
class ProjectedSync:
    """What :func:`sync_by_projection` set up: the synced matrices and the replica group."""

    group: object
    synced: list[torch.Tensor] = field(default_factory=list)

    def describe(self) -> str:
        return (f"grad_sync=projected: {len(self.synced)} matrices averaged through their projections over "
                f"{comm.world_size(self.group)} replicas; the other parameters all-reduced in full")


def _hook_for(synced_ids: set[int], group, optimizer):
    """A DDP communication hook that all-reduces (mean) the entries of a bucket that belong to
    parameters outside ``synced_ids`` and leaves the synced matrices' local gradients as they are.

    A bucket holding a matrix whose exact ``svd`` refresh is due is all-reduced whole, as DDP's own
    hook does it, so the refresh decomposes the very bits of the full-sync run's average (an SVD
    turns the rounding of another summation order into a basis change scaled by the inverse
    singular gap); its synced matrices are then handed to the optimizer as averaged already."""

    def hook(_state, bucket):  # unannotated: DDP checks the annotations, and postponed ones are strings
        if bucket.index() == 0:  # the first bucket of a backward: nothing is averaged in full yet
            optimizer.release_averaged()
        params, buffer = bucket.parameters(), bucket.buffer()
        synced = [p for p in params if id(p) in synced_ids]
        if any(optimizer.full_gradient_due(p) for p in synced):
            optimizer.take_averaged(synced)
            return comm.replica_mean_future(buffer, group).then(lambda fut: fut.value()[0])
        spans, offset = [], 0
        for p, g in zip(params, bucket.gradients()):
            if id(p) not in synced_ids:
                spans.append((offset, g.numel()))
            offset += g.numel()
        if not spans:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(buffer)
            return done
        if len(spans) == 1 and spans[0] == (0, buffer.numel()):
            return comm.replica_mean_future(buffer, group).then(lambda fut: fut.value()[0])
        flat = torch.cat([buffer[start : start + count] for start, count in spans])

        def scatter_back(fut) -> torch.Tensor:
            reduced = fut.value()[0]
            position = 0
            for start, count in spans:
                buffer[start : start + count].copy_(reduced[position : position + count])
                position += count
            return buffer

        return comm.replica_mean_future(flat, group).then(scatter_back)

    return hook


def sync_by_projection(model: torch.nn.Module, optimizer) -> ProjectedSync:
    """Average ``optimizer``'s matrices over DDP's ranks through their projections.

    ``model`` is the ``DistributedDataParallel`` wrapper; call this before the first backward.
    Raises ``ValueError`` with the reason when the optimizer's update needs the full gradient."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"sync_by_projection needs the DistributedDataParallel wrapper, got {type(model).__name__}")
    group = model.process_group
    synced = optimizer.sync_by_projection(group)
    model.register_comm_hook(None, _hook_for({id(p) for p in synced}, group, optimizer))
    return ProjectedSync(group, synced)
