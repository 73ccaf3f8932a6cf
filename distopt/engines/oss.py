"""Whole-parameter sharders: ``torch.distributed.optim.ZeroRedundancyOptimizer`` and fairscale ``OSS``.

Both give each rank whole parameters and build the wrapped optimizer from that rank's share, so a
distopt class works as the wrapped optimizer with ``group=None`` views. What they lose is the
parameter names (they pass bare tensors); ``distopt.name_parameters`` tags them first, so state,
seeds and refresh phases stay keyed by name and the numbers match one process.

fairscale's ``ShardedDataParallel`` needs ``optimizer.zero_grad(set_to_none=False)``: with the
default it leaves stale gradients on non-owned parameters and the run drifts from the reference.
"""

from __future__ import annotations

import torch

from ..api import name_parameters
from ..optim import REGISTRY


def _resolve(model: torch.nn.Module, name: str, hparams: dict, rules):
    """The class, its hyper-parameters and two param groups (element-wise, matrix) in a fixed
    order, kept even when a rank's share of one is empty: the wrappers sync hyper-parameters
    (a scheduled lr) between their groups and the inner optimizer's by position."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    hparams = cls.prepare_model(model, dict(hparams))
    roles = name_parameters(model, rules)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if (roles[n] in cls.matrix_roles) == (kind == "matrix")], "kind": kind}
        for kind in ("adamw", "matrix")
    ]
    return cls, hparams, groups


def zero_redundancy_optimizer(model: torch.nn.Module, name: str, *, rules=None, **hparams):
    """``ZeroRedundancyOptimizer`` over ``model`` with distopt optimizer ``name`` inside."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, hparams, groups = _resolve(model, name, hparams, rules)
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **hparams)


def fairscale_oss(model: torch.nn.Module, name: str, *, rules=None, **hparams):
    """fairscale ``OSS`` over ``model`` with distopt optimizer ``name`` inside."""
    try:
        from fairscale.optim import OSS
    except ImportError as err:
        raise ImportError(
            "fairscale is not installed: pip install --no-build-isolation 'distopt[fairscale]'"
        ) from err
    cls, hparams, groups = _resolve(model, name, hparams, rules)
    return OSS(groups, optim=cls, **hparams)
