"""Layer-wise (optimizer-in-backward) mode: each parameter steps as soon as its gradient is ready.

A post-accumulate-grad hook on every parameter runs that parameter's update and frees its
gradient, so at most one layer's gradients are alive at a time; with low-rank states this is what
lets a 7B model train on one 80 GB GPU. Every distopt update depends only on the parameter's own
gradient, so the numbers equal a normal ``step()``.

What the mode cannot do is refused rather than approximated:
- global gradient clipping needs every gradient before any update (clip per parameter instead, or
  train without clipping);
- gradient accumulation would step on every micro-batch, so call ``backward`` once per step;
- calling ``optimizer.step()`` as well raises.
"""

from __future__ import annotations

import torch

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


def attach(optimizer: SubspaceOptimizer, *, free_grads: bool = True) -> LayerwiseHandle:
    """Make ``optimizer`` step each parameter inside backward; returns a handle to undo it."""
    if not isinstance(optimizer, SubspaceOptimizer):
        raise TypeError(f"layer-wise mode needs a distopt optimizer, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        raise NotImplementedError(
            "layer-wise mode on FSDP2 (DTensor) parameters is not supported: FSDP2 assigns sharded "
            "gradients after its reduce-scatter, outside autograd's accumulation hooks. Use it on one "
            "process or under DDP, or call optimizer.step() under FSDP2."
        )
    optimizer.allocate_state()

    def hook(p: torch.Tensor) -> None:
        optimizer.step_parameter(p)
        if free_grads:
            p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]
    optimizer.layerwise = True
    return LayerwiseHandle(optimizer, hooks)
