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

from ..api import group_of, route


def _resolve(model: torch.nn.Module, name: str, hparams: dict, rules, use_default_rules: bool, elementwise: dict | None):
    """The class, its hyper-parameters and two param groups (element-wise, matrix) in a fixed
    order, kept even when a rank's share of one is empty: the wrappers sync hyper-parameters
    (a scheduled lr) between their groups and the inner optimizer's by position."""
    cls, hparams, routed = route(model, name, hparams, rules=rules, use_default_rules=use_default_rules,
                                 elementwise=elementwise)
    # The wrappers hand each rank a subset of a group's parameters and copy every other key as is,
    # so names and roles travel as the tags ``route`` puts on the tensors, not as lists.
    groups = [group_of(routed, kind, elementwise) for kind in ("adamw", "matrix")]
    return cls, hparams, [{k: v for k, v in g.items() if k not in ("param_names", "roles")} for g in groups]


def zero_redundancy_optimizer(model: torch.nn.Module, name: str, *, rules=None, use_default_rules: bool = True,
                              elementwise: dict | None = None, **hparams):
    """``ZeroRedundancyOptimizer`` over ``model`` with distopt optimizer ``name`` inside, routed as
    :func:`distopt.build_optimizer` routes."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, hparams, groups = _resolve(model, name, hparams, rules, use_default_rules, elementwise)
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **hparams)


def fairscale_oss(model: torch.nn.Module, name: str, *, rules=None, use_default_rules: bool = True,
                  elementwise: dict | None = None, **hparams):
    """fairscale ``OSS`` over ``model`` with distopt optimizer ``name`` inside, routed as
    :func:`distopt.build_optimizer` routes."""
    try:
        from fairscale.optim import OSS
    except ImportError as err:
        raise ImportError(
            "fairscale is not installed: pip install --no-build-isolation 'distopt[fairscale]'"
        ) from err
    cls, hparams, groups = _resolve(model, name, hparams, rules, use_default_rules, elementwise)
    return OSS(groups, optim=cls, **hparams)
