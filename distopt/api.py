"""The public entry points: build an optimizer for a model by name."""

from __future__ import annotations

import collections
import difflib
import inspect
import logging
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from .core.routing import assign_roles
from .optim import REGISTRY
from .optim.base import RENAMED_HPARAMS, SubspaceOptimizer, flat_shard_error

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
        p._distopt_name, p._distopt_role = n, roles[n]  # type: ignore[attr-defined]  # tags on the tensor object
    return roles


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Lay out the model's trainable 2-D weights that share a shape, dtype and device back to back in
    one buffer each, so that a batched optimizer step writes a whole batch of them with one in-place
    kernel (``W <- (1 - lr wd) W + back(N)`` as one ``baddbmm``) instead of forming the updates and
    adding them in another pass. Returns the number of weights moved.

    Each parameter keeps its identity, values and gradient; only its storage moves (``p.data`` is
    re-pointed). Call it right after building the model and before anything keeps the weights'
    storage: ``DistributedDataParallel``, ``torch.compile`` with CUDA graphs, a saved ``p.data``.
    Weights that share storage with another tensor, are strided, sharded (DTensor, DeepSpeed) or
    alone in their shape stay where they are. Optional: the step is the same without it, one
    memory pass slower; it notices the layout (or its loss, after ``model.to()``) on every step.
    """
    holders = collections.Counter(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))
    same: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():  # each tensor once, in the model's order
        if (p.requires_grad and p.dim() == 2 and p.numel() and type(p) is nn.Parameter and not hasattr(p, "ds_id")
                and p.is_contiguous() and p.storage_offset() == 0
                and p.untyped_storage().nbytes() == p.numel() * p.element_size()
                and holders[p.untyped_storage().data_ptr()] == 1):
            same.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    moved = 0
    for (shape, dtype, device), params in same.items():
        if len(params) < 2:
            continue
        buffer = torch.empty((len(params), *shape), dtype=dtype, device=device)
        for i, p in enumerate(params):
            buffer[i].copy_(p)
            p.data = buffer[i]
        moved += len(params)
    logger.info("distopt: %d weights packed into %d buffers", moved, sum(len(ps) > 1 for ps in same.values()))
    return moved


@dataclass(frozen=True)
class RoutedParameter:
    """A trainable parameter as every builder sees it: its name, role, group kind (``"matrix"``:
    the algorithm's; ``"adamw"``: the element-wise group) and global shape."""

    name: str
    param: torch.Tensor
    role: str
    kind: str
    shape: tuple[int, ...]


def resolve_class(name: str, label: str = "{}") -> type[SubspaceOptimizer]:
    """The optimizer class registered as ``name``; an unknown name raises with the closest one.
    ``label`` formats names as the caller's user writes them (``"distopt.{}"`` in a DeepSpeed config)."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {label.format(close[0])!r}?" if close else ""
        raise ValueError(f"unknown optimizer {label.format(name)!r}; choose one of "
                         f"{[label.format(n) for n in list_optimizers()]}.{hint}")
    return REGISTRY[name]


def route(model: nn.Module, name: str, hparams: dict, *, rules=None, use_default_rules: bool = True,
          elementwise: dict | None = None, label: str = "{}") -> tuple[type[SubspaceOptimizer], dict, list[RoutedParameter]]:
    """The one routing path of every builder (:func:`build_optimizer`, DeepSpeed's one-group-per-
    parameter builder, the ZeRO-R and OSS wrappers): the class for ``name``, its hyper-parameters
    after :meth:`prepare_model`, and every trainable parameter routed by name rules and global shape.

    A matrix role with an empty shape goes to the element-wise group (nothing to project); a matrix
    role that is not 2-D raises, as do FSDP1-wrapped models and unknown ``elementwise`` keys."""
    cls = resolve_class(name, label)
    unknown = sorted(set(elementwise or {}) - ELEMENTWISE_KEYS)
    if unknown:
        raise ValueError(f"elementwise={elementwise!r}: unknown keys {unknown}; the element-wise AdamW group takes "
                         f"{sorted(ELEMENTWISE_KEYS)}")
    _refuse_flat_parameter_engines(model)
    # Algorithms that need the model itself (RSO reparametrizes linears in place, Adam-mini reads
    # head counts) do it here, before parameters are collected.
    hparams = cls.prepare_model(model, dict(hparams))
    roles = name_parameters(model, rules, use_default_rules)
    routed = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = _global_shape(p)
        kind = "matrix" if roles[n] in cls.matrix_roles and 0 not in shape else "adamw"
        if kind == "matrix" and len(shape) != 2:
            raise flat_shard_error(n, shape)
        routed.append(RoutedParameter(n, p, roles[n], kind, shape))
    return cls, hparams, routed


def group_of(routed: list[RoutedParameter], kind: str, elementwise: dict | None = None) -> dict:
    """One param group holding the ``kind`` parameters of ``routed`` (possibly none), with their
    names and roles; the element-wise group carries the ``elementwise`` overrides."""
    mine = [r for r in routed if r.kind == kind]
    group = {"params": [r.param for r in mine], "param_names": [r.name for r in mine], "kind": kind,
             "roles": [r.role for r in mine]}
    return {**group, **(elementwise or {})} if kind == "adamw" else group


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    rules=None,
    use_default_rules: bool = True,
    elementwise: dict | None = None,
    **hparams,
) -> SubspaceOptimizer:
    """Build optimizer ``name`` for ``model``'s trainable parameters.

    Parameters are routed by name rules plus global shape: attention and MLP linear weights go to
    the algorithm's matrix group; embeddings, ``lm_head``, norms and biases go to an element-wise
    AdamW group (each algorithm may take more roles, e.g. ``lm_head``). ``rules`` is a list of
    ``(regex, role)`` pairs tried before the defaults, first match wins; a rule that matches no
    parameter raises. ``elementwise`` overrides hyper-parameters (``lr``, ``weight_decay``, ...)
    of the element-wise group only. Every other keyword goes to the optimizer class.
    """
    cls, hparams, routed = route(model, name, hparams, rules=rules, use_default_rules=use_default_rules,
                                 elementwise=elementwise)
    groups = [group_of(routed, kind, elementwise) for kind in ("adamw", "matrix") if any(r.kind == kind for r in routed)]
    optimizer = construct(cls, name, groups, hparams)
    if logger.isEnabledFor(logging.INFO):
        for g in optimizer.param_groups:
            count = sum(p.numel() for p in g["params"])
            logger.info("distopt %s: %s group, %d tensors, %d parameters", name, g["kind"], len(g["params"]), count)
    return optimizer


def construct(cls: type[SubspaceOptimizer], name: str, groups: list[dict], hparams: dict) -> SubspaceOptimizer:
    """``cls(groups, **hparams)``; an unknown keyword raises with the accepted ones and the closest. A
    hyper-parameter under its old name is renamed, with a warning."""
    accepted: Collection[str] = inspect.signature(cls.__init__).parameters
    for old, new in RENAMED_HPARAMS.items():
        if old in hparams and old not in accepted and new in accepted:
            if new in hparams:
                raise TypeError(f"{name}: {old}= is the old name of {new}=; give only {new}=")
            warnings.warn(f"{name}: {old}= is now called {new}=; {old}= will stop working in a later release",
                          FutureWarning, stacklevel=3)
            hparams = {(new if k == old else k): v for k, v in hparams.items()}
    try:
        return cls(groups, **hparams)
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
