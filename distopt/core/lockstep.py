"""Shard-aware routines written as generators, so several matrices can run them in lockstep.

A routine yields requests and is sent their results:
- :class:`Sum`: the tensor summed over its group (in place);
- :class:`Gather`: the same-shaped tensors of every rank of the group, stacked;
- :class:`Owned`: ``fn()`` of inputs every rank of the group holds alike (a QR of an all-reduced
  block, a small eigendecomposition). Alone, every rank computes it, as plain code would; in
  lockstep one rank computes it and broadcasts the result, so the replicated work of several
  matrices is split over the ranks instead of repeated on each.

:func:`run` drives one routine; :func:`run_together` drives several, overlapping one's collectives
with the others' work and spreading their ``Owned`` work over the ranks. Both give the same numbers
to rounding: an ``Owned`` result is the same wherever it is computed, since its inputs are.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from . import comm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass
class Sum:
    tensor: torch.Tensor
    group: ProcessGroup | None


@dataclass
class Gather:
    tensor: torch.Tensor
    group: ProcessGroup | None


@dataclass
class Owned:
    fn: Callable[[], torch.Tensor]  # returns fp32 (the buffer other ranks receive into)
    shape: tuple[int, ...]
    cost: float  # relative, for load balancing (flops are fine)
    group: ProcessGroup | None
    device: torch.device


# Yields requests and is sent their results; returns the routine's result.
Routine = Generator["Sum | Gather | Owned", torch.Tensor, torch.Tensor]


def run(routine: Routine) -> torch.Tensor:
    """Drive one routine alone; ``Owned`` work is done on every rank."""
    reply: Any = None  # the first send, which starts the routine, must be None
    while True:
        try:
            request = routine.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, Sum):
            reply = comm.all_reduce_sum(request.tensor, request.group)
        elif isinstance(request, Gather):
            reply = comm.all_gather_stacked(request.tensor, request.group)
        else:
            reply = _compute(request)


def run_together(routines: list[Routine]) -> list[torch.Tensor]:
    """Drive several routines, visiting them in turn: each waits only for its own last request, so
    one routine's collective runs while the next computes. Every rank must pass the same routines in
    the same order: they then issue the same collectives in the same order, and since each wait is
    for a collective issued earlier, no rank can wait forever. ``Owned`` work goes to the rank with
    the least ``Owned`` cost so far (the same choice on every rank)."""
    results: list[torch.Tensor | None] = [None] * len(routines)
    waits: list[Callable[[], Any]] = [lambda: None] * len(routines)  # None starts a routine
    loads: dict[int, list[float]] = {}
    active = list(range(len(routines)))
    while active:
        going = []
        for i in active:
            try:
                request = routines[i].send(waits[i]())
            except StopIteration as stop:
                results[i] = stop.value
                continue
            waits[i] = _start(request, loads)
            going.append(i)
        active = going
    return cast("list[torch.Tensor]", results)  # every routine has returned


def _start(request: Sum | Gather | Owned, loads: dict[int, list[float]]) -> Callable[[], torch.Tensor]:
    """Issue ``request``; the returned function waits for its result."""
    if isinstance(request, Sum):
        summing = comm.all_reduce_sum_async([(request.tensor, request.group)])
        return lambda: (summing(), request.tensor)[1]
    if isinstance(request, Gather):
        gathering = comm.all_gather_stacked_async([(request.tensor, request.group)])
        return lambda: gathering()[0]
    load = loads.setdefault(id(request.group), [0.0] * comm.world_size(request.group))
    owner = min(range(len(load)), key=lambda rank: (load[rank], rank))
    load[owner] += request.cost
    if owner == comm.rank(request.group):
        result = _compute(request)
    else:
        result = torch.empty(request.shape, dtype=torch.float32, device=request.device)
    broadcasting = comm.broadcast_async([(result, owner, request.group)])
    return lambda: (broadcasting(), result)[1]


def _compute(request: Owned) -> torch.Tensor:
    # Contiguous: a LAPACK result is column-major, and a broadcast sends raw storage.
    result = request.fn().contiguous()
    if tuple(result.shape) != tuple(request.shape):
        raise RuntimeError(f"Owned result has shape {tuple(result.shape)}, announced {tuple(request.shape)}: "
                           "the other ranks would receive into a buffer of the announced shape")
    return result
