"""The public entry points: build an optimizer for a model by name."""

from __future__ import annotations

import difflib
import inspect
import logging

import torch
from torch import nn

from .core.routing import assign_roles
from .optim import REGISTRY
from .optim.base import flat_shard_error

logger = logging.getLogger("distopt")
# Hyper-parameters the element-wise AdamW group understands (``build_optimizer(elementwise=...)``).
ELEMENTWISE_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "adam_form"})


def list_optimizers() -> list[str]:
    """Names accepted by :func:`build_optimizer`."""
    return sorted(REGISTRY)


def _refuse_flat_parameter_engines(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ValueError(
                "the model is wrapped in FSDP1 (FullyShardedDataParallel), which hands optimizers flat 1-D "
                "FlatParameter shards with row boundaries lost. Use FSDP2 instead: "
                "`from torch.distributed.fsdp import fully_shard`, call fully_shard(layer) on each block and "
                "fully_shard(model), then build_optimizer(model, ...)."
            )


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    # DeepSpeed zero.Init placeholders are empty with the true shape in ds_shape.
    return tuple(getattr(p, "ds_shape", p.shape))


def name_parameters(model: nn.Module, rules=None, use_default_rules: bool = True) -> dict[str, str]:
    """Give every trainable parameter its name and routing role, as attributes on the tensor.

    Wrappers that build the optimizer from bare parameters (``ZeroRedundancyOptimizer``, fairscale
    ``OSS``) then still key state, seeds and refresh phases by name. Returns ``{name: role}``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    roles = assign_roles([n for n, _ in named], rules, use_default_rules)
    for n, p in named:
        p._distopt_name, p._distopt_role = n, roles[n]
    return roles


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    rules=None,
    use_default_rules: bool = True,
    elementwise: dict | None = None,
    **hparams,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``'s trainable parameters.

    Parameters are routed by name rules plus global shape: attention and MLP linear weights go to
    the algorithm's matrix group; embeddings, ``lm_head``, norms and biases go to an element-wise
    AdamW group (each algorithm may take more roles, e.g. ``lm_head``). ``rules`` is a list of
    ``(regex, role)`` pairs tried before the defaults, first match wins; a rule that matches no
    parameter raises. ``elementwise`` overrides hyper-parameters (``lr``, ``weight_decay``, ...)
    of the element-wise group only. Every other keyword goes to the optimizer class.
    """
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list_optimizers()}.{hint}")
    cls = REGISTRY[name]
    unknown = sorted(set(elementwise or {}) - ELEMENTWISE_KEYS)
    if unknown:
        raise ValueError(f"elementwise={elementwise!r}: unknown keys {unknown}; the element-wise AdamW group takes "
                         f"{sorted(ELEMENTWISE_KEYS)}")
    _refuse_flat_parameter_engines(model)
    # Algorithms that need the model itself (RSO reparametrizes linears in place, Adam-mini reads
    # head counts) do it here, before parameters are collected.
    hparams = cls.prepare_model(model, dict(hparams))
    roles = name_parameters(model, rules, use_default_rules)
    matrix, element = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = _global_shape(p)
        if roles[n] in cls.matrix_roles and 0 not in shape:  # an empty weight has nothing to project
            if len(shape) != 2:
                raise flat_shard_error(n, shape)
            matrix.append((n, p))
        else:
            element.append((n, p))
    groups = []
    if element:
        groups.append({"params": [p for _, p in element], "param_names": [n for n, _ in element],
                       "kind": "adamw", "roles": [roles[n] for n, _ in element], **(elementwise or {})})
    if matrix:
        groups.append({"params": [p for _, p in matrix], "param_names": [n for n, _ in matrix],
                       "kind": "matrix", "roles": [roles[n] for n, _ in matrix]})
    try:
        optimizer = cls(groups, **hparams)
    except TypeError as err:
        accepted = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")]
        unknown = [k for k in hparams if k not in accepted]
        hints = []
        for key in unknown:
            if key == "shard_basis":
                hints.append("shard_basis became state_layout: 'partitioned' (the default) splits bases and "
                             "moments over the ranks, 'replicated' keeps them whole")
            elif close := difflib.get_close_matches(key, accepted, n=1):
                hints.append(f"{key!r}: did you mean {close[0]!r}?")
        detail = f" ({'; '.join(hints)})" if hints else ""
        raise TypeError(f"{name}: {err}{detail}. It takes: {', '.join(accepted)}") from None
    if logger.isEnabledFor(logging.INFO):
        for g in optimizer.param_groups:
            count = sum(p.numel() for p in g["params"])
            logger.info("distopt %s: %s group, %d tensors, %d parameters", name, g["kind"], len(g["params"]), count)
    return optimizer
