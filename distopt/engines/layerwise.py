"""Layer-wise (optimizer-in-backward) mode: each parameter steps as soon as its gradient is final.

A post-accumulate-grad hook on every parameter runs that parameter's update and frees its
gradient, so only the gradients still in flight are alive; with low-rank states this is what lets
a 7B model train on one 80 GB GPU. Every distopt update depends only on the parameter's own
gradient, so the numbers equal a normal ``step()``.

Several ranks:
- **FSDP2 / HSDP** (DTensor parameters): FSDP2 runs the hooks on the sharded parameters after its
  reduce-scatter, with the reduced gradient shard, in the same order on every rank; each shard
  steps there, its collectives included, and is freed.
- **Data parallel** (replicated parameters): pass ``data_parallel=True`` and do *not* wrap the model
  in DDP. The hook starts an asynchronous all-reduce of each gradient as autograd produces it and
  steps the parameter once its average has arrived (at the latest when backward ends), so every
  rank applies the mean gradient of the global batch, as DDP would. DDP itself cannot be used: it
  averages gradients after these hooks have run, so each rank would step on its own gradient.

What the mode cannot do is refused rather than approximated:
- global gradient clipping needs every gradient before any update (clip per parameter instead, or
  train without clipping);
- gradient accumulation would step on every micro-batch, so call ``backward`` once per step;
- calling ``optimizer.step()`` as well raises;
- several ranks with replicated parameters and no ``data_parallel`` choice raise at attach time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.distributed as dist

from ..core.shard import is_dtensor
from ..optim.base import SubspaceOptimizer


class LayerwiseHandle:
    def __init__(self, optimizer: SubspaceOptimizer, hooks: list):
        self.optimizer = optimizer
        self._hooks = hooks

    def remove(self) -> None:
        """Go back to stepping with ``optimizer.step()``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.optimizer.layerwise = False


class _Averager:
    """Averages each gradient over the data-parallel group with an asynchronous all-reduce, and
    steps its parameter once the average has arrived; whatever is still in flight when backward
    ends is waited for in a callback autograd runs at the end of the pass."""

    def __init__(self, optimizer: SubspaceOptimizer, group, free_grads: bool, in_flight: int):
        self.optimizer, self.group, self.free_grads, self.in_flight = optimizer, group, free_grads, in_flight
        self.world = dist.get_world_size(group)
        self.pending: list[tuple[torch.Tensor, dist.Work]] = []
        self.callback_queued = False

    def __call__(self, p: torch.Tensor) -> None:
        if not self.callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self.callback_queued = True
        self.pending.append((p, dist.all_reduce(p.grad, group=self.group, async_op=True)))
        # Step what has arrived; past ``in_flight`` gradients, wait for the oldest (bounded memory).
        while self.pending and (self.pending[0][1].is_completed() or len(self.pending) > self.in_flight):
            self._step(*self.pending.pop(0))

    def _step(self, p: torch.Tensor, work) -> None:
        work.wait()
        cast(torch.Tensor, p.grad).div_(self.world)  # all-reduced in __call__
        self.optimizer.step_parameter(p)
        if self.free_grads:
            p.grad = None

    def finish(self) -> None:
        while self.pending:
            self._step(*self.pending.pop(0))
        self.callback_queued = False


def attach(optimizer: SubspaceOptimizer, *, free_grads: bool = True, data_parallel: bool | None = None,
           group=None, in_flight: int = 4) -> LayerwiseHandle:
    """Make ``optimizer`` step each parameter inside backward; returns a handle to undo it.

    ``data_parallel`` (needed, and only allowed, when several ranks hold replicated parameters):
    ``True`` averages every gradient over ``group`` (default: the whole world) before its step, in
    place of DDP, with at most ``in_flight`` all-reduces outstanding (so at most that many
    gradients alive beyond the one being produced); ``False`` lets each rank step on its own
    gradient (independent replicas)."""
    if not isinstance(optimizer, SubspaceOptimizer):
        raise TypeError(f"layer-wise mode needs a distopt optimizer, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = any(is_dtensor(p) for p in params)
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if sharded and data_parallel:
        raise ValueError("data_parallel=True is for replicated parameters; FSDP2/HSDP (DTensor) parameters already "
                         "receive reduced gradient shards: leave data_parallel unset")
    if several and not sharded and data_parallel is None:
        raise ValueError(
            f"layer-wise mode on {dist.get_world_size(group)} ranks with replicated parameters: pass data_parallel=True "
            "to average every gradient over the ranks before its step (and do not wrap the model in DDP, which would "
            "average only after the step), or data_parallel=False for independent replicas"
        )
    optimizer.allocate_state()
    hook: Callable[[torch.Tensor], None]
    if data_parallel and several:
        if in_flight < 1:
            raise ValueError(f"in_flight={in_flight}: must be at least 1")
        hook = _Averager(optimizer, group, free_grads, in_flight)
    else:
        def hook(p: torch.Tensor) -> None:
            optimizer.step_parameter(p)
            if free_grads:
                p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]
    optimizer.layerwise = True
    return LayerwiseHandle(optimizer, hooks)
