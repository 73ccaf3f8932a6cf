"""The base class every distopt optimizer derives from.

It holds two kinds of parameter groups:
- ``kind="adamw"``: element-wise AdamW (embeddings, the LM head, norms, biases, anything 1-D);
- ``kind="matrix"``: 2-D matrices, each stepped by the algorithm through a :class:`MatrixShardView`.

It also owns what every algorithm needs the same way: validation, explicit state allocation,
skipping parameters whose gradient is not finite, and a state dict keyed by parameter name.

It is longer than the project's other modules (about 800 lines) because it is one class: the step
loop, the state-dict checks and the public methods the engine bindings call are read together, and
the binding contract (:class:`EngineBinding`) sits beside the code that calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import operator
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch.optim.adamw import adamw as _functional_adamw

from ..core import batching, comm
from ..core.options import check_option
from ..core.projector import prepared_bases
from ..core.shard import MatrixShardView, dtensor_view, is_dtensor, local, locals_of, lpt_owners, whole_matrix_view
from .args_doc import add_args_section

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger("distopt")

ADAM_FORMS = ("torch", "hf")
STATE_FORMAT = 1
# Group key set only by engine adapters (``distopt.deepspeed``) on the groups they build. Such a
# group holds one parameter; once the adapter has bound itself (``bind``), the 1-D partition an
# engine swaps into the group is stepped through the adapter. Without a binding it is refused.
ADAPTER_KEY = "adapter"


@runtime_checkable
class EngineBinding(Protocol):
    """What an engine adapter provides once bound (:meth:`SubspaceOptimizer.bind`). The optimizer
    calls these hooks for the groups marked with :data:`ADAPTER_KEY`; the adapter in turn calls
    only the optimizer's public methods (``step_matrix``, ``step_elementwise``,
    ``row_sharded_keys``, ``chunked_state``, ``parameter``)."""

    def state_params(self, group: dict) -> list[torch.Tensor]:
        """The tensors the group's state is keyed by (the engine may swap ``group["params"]``)."""

    def state_template(self, p: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like this rank's share of ``p``, to size its state by."""

    def begin_step(self, groups: list[dict]) -> None:
        """Called once per ``step()`` with the bound groups it will step (skip decisions)."""

    def step_group(self, optimizer: SubspaceOptimizer, group: dict) -> None:
        """Step one bound group."""

    def import_value(self, optimizer: SubspaceOptimizer, p: torch.Tensor, group: dict, key: str, value):
        """This rank's share of a whole state tensor being loaded."""

    def check_state_dict(self, optimizer: SubspaceOptimizer, state_dict: dict) -> None:
        """Raise if ``state_dict`` was written under a partition layout this one cannot read."""

    def describe(self, optimizer: SubspaceOptimizer) -> dict:
        """Where this rank's partitions lie, saved with the state dict."""


def flat_shard_error(name: str, shape: tuple[int, ...]) -> ValueError:
    if len(shape) > 2:
        return ValueError(
            f"parameter {name!r} of shape {tuple(shape)} reached the matrix group, which takes 2-D weights; a "
            f"{len(shape)}-D tensor (a convolution kernel, a stacked expert weight) has no single row/column "
            "layout to project. Route it to the element-wise group with rules=[(pattern, 'other')], or reshape "
            "it into a 2-D parameter in the model."
        )
    return ValueError(
        f"parameter {name!r} reached the matrix group as a flat 1-D tensor of shape {tuple(shape)}. "
        "DeepSpeed ZeRO-1/2/3 and FSDP1 (FlatParameter) hand optimizers flat shards, which lose the "
        "row/column structure subspace methods need. Fix: build the engine with "
        "distopt.deepspeed.initialize(...) for ZeRO, or shard with FSDP2 fully_shard instead of FSDP1; "
        "to train this parameter element-wise instead, route it with rules=[(pattern, 'other')]."
    )


def check_lr(lr) -> None:
    value = float(lr)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr={lr!r}: the learning rate must be a finite number >= 0")
    if value > torch.finfo(torch.float32).max:  # it multiplies fp32 tensors: inf from the first step
        raise ValueError(f"lr={lr!r}: above the largest float32 ({torch.finfo(torch.float32).max:.3g}); use a real learning rate")


def check_common_hparams(group: dict) -> None:
    check_lr(group["lr"])
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r}: need two values in [0, 1)")
    check_option(group, "eps", low=0)
    check_option(group, "weight_decay", low=0)
    if "adam_form" in group:
        check_option(group, "adam_form", "choice", choices=ADAM_FORMS)


def hyperparameters(arguments: dict) -> dict:
    """A constructor's group defaults from its ``locals()``, taken before it binds anything else.

    Every keyword after ``params``, in signature order, with ``betas`` made a tuple. It lets each
    optimizer spell its hyper-parameters and their defaults once, in its signature.
    """
    defaults = {key: value for key, value in arguments.items() if key not in ("self", "params") and not key.startswith("__")}
    if "betas" in defaults:
        defaults["betas"] = tuple(defaults["betas"])
    return defaults


def update_moments(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float, form: str) -> None:
    """EMA of the gradient and its square, in place (op order of each form, for exact parity)."""
    if form == "hf":
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    else:
        exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg, exp_avg_sq, step: int, beta1: float, beta2: float, eps: float, lr: float, form: str):
    """Adam's normalized direction and its step size, so that the update is ``-step_size * direction``.

    ``torch`` is torch.optim.AdamW's form (eps added to the bias-corrected RMS). ``hf`` is the
    Hugging Face / galore-torch form (eps added to the raw RMS, correction folded into the step size).
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if form == "hf":
        return exp_avg / (exp_avg_sq.sqrt() + eps), lr * math.sqrt(bc2) / bc1
    return exp_avg / (exp_avg_sq.sqrt() / math.sqrt(bc2) + eps), lr / bc1


def apply_update(param, update, step_size: float, lr: float, weight_decay: float, form: str) -> None:
    """``param -= step_size * update`` with decoupled weight decay, in the order of ``form``."""
    if form == "torch" and weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-step_size)
    if form == "hf" and weight_decay:
        param.add_(param, alpha=-lr * weight_decay)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA fp32 matmuls with TF32 ``enabled`` or not, whatever the global flag (restored on exit)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def fp32_matmuls():
    """Full fp32 matmuls inside the optimizer whatever the global TF32 flag: a basis refresh squares
    its sketch, and TF32's 10-bit mantissa would lose the basis's tail."""
    return tf32_matmuls(False)


def _warn_tf32_override() -> None:
    # A function attribute, which mypy cannot declare.
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1" and not _warn_tf32_override.done:  # type: ignore[attr-defined]
        _warn_tf32_override.done = True  # type: ignore[attr-defined]
        logger.warning("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (set by NGC images) makes cuBLAS run fp32 matmuls in TF32 "
                       "whatever the flags, the optimizer's projections and basis refreshes included; unset it for "
                       "fp32 optimizer math")


_warn_tf32_override.done = False  # type: ignore[attr-defined]  # a function attribute


_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_device_type_of = operator.attrgetter("device.type")
_exp_avg_of, _exp_avg_sq_of, _step_of = map(operator.itemgetter, ("exp_avg", "exp_avg_sq", "step"))


def _all_have_grads(params: list[torch.Tensor]) -> bool:
    """Whether no parameter's ``grad`` is ``None`` (one pass in C, no Python call per parameter)."""
    return all(map(operator.is_not, map(_grad_of, params), itertools.repeat(None)))


def any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 (a 0-d tensor) where some element of ``tensors`` (CPU, floating point) is NaN or Inf, else
    0.0: one multi-tensor pass (the check of AMP's grad scaler, scaling by exactly 1, which changes
    no bit), five times faster on CPU than a reduction per tensor."""
    found = torch.zeros(())
    one = torch.ones(())
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    if len(set(map(_dtype_of, tensors))) == 1:  # the usual case: one call, no Python pass
        by_dtype[tensors[0].dtype] = tensors
    else:
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same, found, one)
    return found


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: element-wise AdamW for the ``adamw`` group, the algorithm for ``matrix`` groups.

    Subclasses set ``algorithm``, ``matrix_roles`` (which parameter roles they take as matrices),
    ``shape_hparams`` (hyper-parameters that fix state shapes, checked when a checkpoint loads)
    and implement ``_init_matrix_state`` and ``_matrix_step``.
    """

    algorithm = "base"
    matrix_roles: frozenset = frozenset()
    shape_hparams: tuple[str, ...] = ()
    # Hyper-parameters that only choose how state is laid out across ranks: a checkpoint written
    # with other values still loads (it is resharded), and the current values are kept.
    layout_hparams: tuple[str, ...] = ("state_layout",)
    # Defaults of the element-wise group that differ from the class's (``elementwise=`` still wins).
    elementwise_defaults: dict = {}
    # Set by distopt.engines.layerwise.attach() (absent before: step() reads it from __dict__).
    layerwise: bool

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ and "algorithm" in cls.__dict__:  # a concrete algorithm's own options
            add_args_section(cls)

    def __init__(self, params, defaults: dict):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = self._split_unnamed(groups)
        self._names: dict[torch.Tensor, str] = {}
        self._views: dict[torch.Tensor, MatrixShardView] = {}
        # Bumped whenever a view changes: what is cached from the views (batches of matrices) is stale.
        self._views_version = 0
        self._roles: dict[torch.Tensor, str] = {}
        self._by_name: dict[str, torch.Tensor] = {}
        self._row_keys_cache: dict[torch.Tensor, dict[str, tuple[int, ...]]] = {}
        self.nonfinite_skips: dict[str, int] = {}
        # This step's projected gradients, taken ahead by clip_grad_norm_ (by view name); step() uses
        # and clears them.
        self._prepared_lows: dict[str, torch.Tensor] = {}
        # Projected sync: views of matrices an engine averaged in full this step (see take_averaged),
        # by the view they replace until step() ends, and their replica-free twins (stable identity).
        self._averaged_views: dict[torch.Tensor, MatrixShardView] = {}
        self._unsynced_twins: dict[int, tuple[MatrixShardView, MatrixShardView]] = {}
        # Set by an engine adapter (distopt.deepspeed) after the engine is built: see bind().
        self._binding: EngineBinding | None = None
        super().__init__(groups, defaults)
        _warn_tf32_override()

    def _split_unnamed(self, groups: list[dict]) -> list[dict]:
        """Groups built from bare parameters (``Opt(model.parameters())``, or inside
        ZeroRedundancyOptimizer / fairscale OSS) take the names and roles that
        ``distopt.name_parameters`` tagged on the tensors, else ``param<i>`` and a split by
        dimensionality, and are divided into matrix and element-wise groups."""
        out = []
        counter = 0
        for group in groups:
            group = dict(group)
            params = list(group["params"])
            given = group.pop("param_names", None)
            names = [given[i] if given else getattr(p, "_distopt_name", f"param{counter + i}") for i, p in enumerate(params)]
            roles = group.pop("roles", None) or [getattr(p, "_distopt_role", "matrix" if p.dim() == 2 else "other") for p in params]
            counter += len(params)
            if "kind" in group:  # the caller chose the kind: keep the group as it is, even if empty
                out.append({**group, "params": params, "param_names": names, "roles": roles})
                continue
            for kind in ("adamw", "matrix"):
                picked = [i for i, p in enumerate(params)
                          if (roles[i] in self.matrix_roles and p.dim() == 2 and 0 not in getattr(p, "ds_shape", p.shape))
                          == (kind == "matrix")]
                if picked:
                    out.append({**group, "params": [params[i] for i in picked], "param_names": [names[i] for i in picked],
                                "roles": [roles[i] for i in picked], "kind": kind})
        return out

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("kind") == "adamw":
            param_group = {**self.elementwise_defaults, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(group["param_names"]) != len(group["params"]):
            raise ValueError("param_names must list one name per parameter")
        if group["kind"] not in ("adamw", "matrix"):
            raise ValueError(f"group kind={group['kind']!r} must be 'adamw' or 'matrix'")
        check_common_hparams(group)
        if group["kind"] == "matrix":
            self._check_matrix_hparams(group)
        roles = group.get("roles") or ["matrix" if group["kind"] == "matrix" else "other"] * len(group["params"])
        for p, name, role in zip(group["params"], group["param_names"], roles):
            if name in self._names.values():
                raise ValueError(f"parameter name {name!r} appears twice")
            self._names[p] = name
            self._by_name[name] = p
            self._roles[p] = role
            if is_dtensor(p):  # algorithms receive the local shard
                self._roles[local(p)] = role
            if group["kind"] == "matrix":
                self._views[p] = self._make_view(name, p, placeholder_ok=bool(group.get(ADAPTER_KEY)))
        self._assign_owners(group)
        self._views_version += 1

    def _assign_owners(self, group: dict) -> None:
        """Spread whole-matrix work (exact SVD refreshes) of row-sharded matrices over the ranks
        holding them, balanced by cost (LPT)."""
        sharded = [p for p in group["params"] if p in self._views and self._views[p].sharded]
        if not sharded:
            return
        views = {self._views[p].name: self._views[p] for p in sharded}
        ranks = len(next(iter(views.values())).row_counts)
        costs = {name: v.m * v.n * min(v.m, v.n) for name, v in views.items()}
        owners = lpt_owners(costs, ranks)
        for p in sharded:
            self._views[p] = dataclasses.replace(self._views[p], owner=owners[self._views[p].name])

    def _make_view(self, name: str, p: torch.Tensor, placeholder_ok: bool = False) -> MatrixShardView:
        if is_dtensor(p):
            return dtensor_view(name, p)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if len(shape) != 2:
            raise flat_shard_error(name, shape)
        if tuple(p.shape) != shape:
            if not placeholder_ok:  # a zero.Init placeholder is fine only in an adapter's group
                raise flat_shard_error(name, tuple(p.shape))
            return MatrixShardView(name=name, global_shape=(shape[0], shape[1]))
        return whole_matrix_view(name, p)

    # -- hooks for subclasses --------------------------------------------------------------
    @classmethod
    def prepare_model(cls, model: torch.nn.Module, hparams: dict) -> dict:
        """Called by ``build_optimizer`` before routing; may change the model and the hyper-parameters."""
        return hparams

    # -- what engine adapters call (see EngineBinding) -----------------------------------------------
    def bind(self, binding: EngineBinding, views: dict[torch.Tensor, MatrixShardView]) -> None:
        """Let ``binding`` step the groups marked with :data:`ADAPTER_KEY`, with ``views`` (this
        rank's rows of each matrix under the engine's partitioning) replacing the build-time ones."""
        if not isinstance(binding, EngineBinding):
            raise TypeError(f"{type(binding).__name__} does not provide the EngineBinding hooks")
        self.set_views(views)
        self._binding = binding

    @property
    def binding(self) -> EngineBinding | None:
        return self._binding

    def projections_in_model(self) -> dict[torch.Tensor, torch.Tensor]:
        """Projections this optimizer keeps in the model rather than in its state, by parameter
        (RSO's ``P``); ``state_bytes`` counts them. None by default."""
        return {}

    @property
    def views(self) -> dict[torch.Tensor, MatrixShardView]:
        """Each matrix's shard view, by parameter (a copy)."""
        return dict(self._views)

    def set_views(self, views: dict[torch.Tensor, MatrixShardView]) -> None:
        """Replace the views of some matrices (an engine's partitioning, or one the memory estimator
        simulates) before state is allocated; what was derived from them is recomputed."""
        unknown = [self._names.get(p, f"a tensor of shape {tuple(p.shape)}") for p in views if p not in self._views]
        if unknown:
            raise ValueError(f"{unknown} are not matrices of this optimizer")
        self._views.update(views)
        self._views_version += 1
        self._row_keys_cache.clear()  # row-sharded keys depend on the views

    def parameter(self, name: str) -> torch.Tensor:
        """The parameter this optimizer was built with under ``name``."""
        return self._by_name[name]

    # -- projected gradient sync (distopt.engines.ddp, HSDP) ------------------------------------
    def projected_sync_refusal(self, group: dict) -> str | None:
        """Why this matrix group's update cannot be had from averaged projections of ``G`` alone
        (``None``: it can). By default an algorithm needs the averaged full gradient."""
        return (f"{self.algorithm} uses the full gradient, not only linear maps of it, in its update "
                "(a full-rank second moment, a residual or a norm of G)")

    def sync_by_projection(self, replicas) -> list[torch.Tensor]:
        """Average the matrices' gradients over ``replicas`` through their projections and refresh
        sketches instead of in full: set each matrix view's ``replicas`` and return the matrices,
        whose full all-reduce the engine must then skip. Exact: every map of ``G`` the update uses
        is linear, so averaging the maps equals mapping the average. Refused, with the reason, for a
        group that needs more than that."""
        matrices = [p for group in self.param_groups if group["kind"] == "matrix" for p in group["params"]]
        reasons = {self.projected_sync_refusal(g) for g in self.param_groups if g["kind"] == "matrix" and g["params"]}
        reasons.discard(None)
        if reasons:
            raise ValueError(
                f"projected gradient sync is not available here: {'; '.join(sorted(r for r in reasons if r))}. "
                "Use the full gradient sync (engine.grad_sync=full, or plain DDP/HSDP without distopt's sync)."
            )
        if self.state:
            raise RuntimeError("call sync_by_projection before the first step (the views change how gradients are read)")
        self.set_views({p: dataclasses.replace(self._views[p], replicas=replicas) for p in matrices})
        return matrices

    def full_gradient_due(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s next step reads its averaged gradient whole rather than through linear maps
        (an exact ``svd`` refresh is due): an engine syncing by projection then averages it in full."""
        return False

    def take_averaged(self, params: list[torch.Tensor]) -> None:
        """The gradients of ``params`` are already the replicas' average this step (an engine reduced
        them in full): until step() ends, their projections are used as they are, not averaged again."""
        for p in params:
            view = self._views[p]
            if view.replicas is None:
                continue
            twin = self._unsynced_twins.get(id(view))
            if twin is None or twin[0] is not view:
                twin = (view, dataclasses.replace(view, replicas=None))
                self._unsynced_twins[id(view)] = twin
            self._averaged_views[p] = view
            self._views[p] = twin[1]
            self._views_version += 1

    def release_averaged(self) -> None:
        """Undo :meth:`take_averaged`: every synced matrix is averaged by projection again."""
        if self._averaged_views:
            self._views.update(self._averaged_views)
            self._views_version += 1
            self._averaged_views.clear()

    def _whole_on_every_shard(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s prepared projection is whole on every rank of its shard group."""
        return False

    def prepare_projections(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Projected algorithms take this step's refreshes and ``proj(G)`` ahead (see
        ``ProjectedAdam``); the others project nothing."""
        return {}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` and return ``norm``: the norm
        of the gradient as the step uses it. For a projected matrix that is ``proj(G)`` in the basis
        of this step (refreshed first when due), averaged over the replicas under projected sync; for
        every other parameter, its gradient. It is the same on every replica, so it clips them alike,
        and it is what the full-sync run gives with this method. The refresh is scale-free, so
        clipping ``proj(G)`` equals clipping ``G``. Call it after backward and right before
        :meth:`step`, which reuses the projections. A non-finite gradient anywhere gives a NaN norm
        and every parameter skips the step, as ``torch.nn.utils.clip_grad_norm_`` makes it."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(self._bound(g) for g in self.param_groups if g["params"]):
            raise ValueError("clip_grad_norm_ does not take engine-managed (DeepSpeed ZeRO) groups: clip with "
                             "DeepSpeed's gradient_clipping")
        if any(is_dtensor(p) and p.device_mesh.ndim > 1 for p in params):
            raise ValueError("clip_grad_norm_ takes FSDP2 shards on a 1-D mesh (HSDP's projected sync shards on "
                             "mesh['shard']); clip a 2-D HSDP model with torch.nn.utils.clip_grad_norm_")
        if not params:
            return torch.zeros(())
        if self._nonfinite_flags(params).max().item():
            for p in params:
                p.grad.fill_(math.nan)
            return torch.tensor(math.nan)
        lows = self.prepare_projections(params)
        # Squares summed over what this rank holds, then over each shard group: a row shard, a
        # column chunk or an FSDP2 shard counts once; a whole r x n left projection held by every
        # rank of the group counts on its first rank only.
        by_group: dict[int, tuple[object, list[torch.Tensor]]] = {}
        for p in params:
            if p in lows:
                view = self._views[p]
                group, value = view.group, lows[p].float().square().sum()
                if view.sharded and self._whole_on_every_shard(p) and view.index != 0:
                    value = value * 0.0  # kept, as zero: every rank issues the same reductions
            else:
                group = p.device_mesh.get_group() if is_dtensor(p) else None
                value = local(p.grad).float().square().sum()
            by_group.setdefault(id(group), (group, []))[1].append(value)
        sums = [comm.all_reduce_sum(torch.stack(values).sum(), group) for group, values in by_group.values()]
        total = torch.stack(sums).sum().sqrt()
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([local(p.grad) for p in params], coef)
            torch._foreach_mul_(list(lows.values()), coef)
        return total

    def step_matrix(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        """The algorithm's update of one matrix's local rows ``p`` (in place), given their gradient."""
        self._matrix_step(p, grad, state, group, view)

    def step_elementwise(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                         states: list[dict]) -> None:
        """The element-wise AdamW update of local tensors (in place)."""
        self._adamw_apply(group, params, grads, states)

    def chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        """State tensors split over the shard group in ``torch.chunk`` pieces by rank rather than by
        the matrix's rows, as ``{key: (global shape, split dim)}`` (:meth:`_chunked_state`)."""
        return self._chunked_state(p, group)

    def _check_matrix_hparams(self, group: dict) -> None:
        """Validate algorithm-specific hyper-parameters of a matrix group."""

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        raise NotImplementedError

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        raise NotImplementedError

    def _refresh_request(self, group: dict, state: dict, view: MatrixShardView, grad: torch.Tensor):
        """The inputs (``SvdRequest`` or ``RangeRequest`` of ``core.projector``) of the data-driven
        refresh this matrix's next step will do, else ``None``. The step computes those refreshes
        together, spreading the work over the ranks; a wrong answer only costs time (the step then
        refreshes on its own), never different numbers."""
        return None

    # -- state ------------------------------------------------------------------------------
    def param_name(self, p: torch.Tensor) -> str:
        return self._names[p]

    def param_role(self, p: torch.Tensor) -> str:
        """Routing role (``q``, ``v``, ``mlp_in``, ``embedding``, ...; see ``core.routing``) of a
        parameter, or of the local shard an algorithm receives."""
        return self._roles[p]

    def role_by_name(self, name: str) -> str:
        """Routing role of the parameter called ``name`` (a view's ``name``). Unlike
        :meth:`param_role` it also works for tensors that are not registered, such as the meta
        tensors ``_init_matrix_state`` is called with to find which state is row-sharded."""
        table = self.__dict__.setdefault("_role_by_name", {})
        if name not in table:
            table.update({n: self._roles[p] for p, n in self._names.items()})
        return table[name]

    def _bound(self, group: dict) -> bool:
        """Whether an engine adapter steps this group (see ADAPTER_KEY)."""
        return self._binding is not None and bool(group.get(ADAPTER_KEY))

    def _state_params(self, group: dict) -> list[torch.Tensor]:
        """The tensors a group's state is keyed by: its parameters, or, for a bound group, the
        model parameter whose partition the engine hands over."""
        # A bound group implies a binding.
        return cast(EngineBinding, self._binding).state_params(group) if self._bound(group) else group["params"]

    @torch.no_grad()
    def allocate_state(self, groups: list[dict] | None = None) -> None:
        """Create every state tensor at its final shape, before any step (of ``groups`` only, if given).

        Checkpoint loaders (``load_state_dict``, DCP) then write into pre-sized tensors, and
        ``state_bytes`` is exact from the start. Idempotent.
        """
        for group in self.param_groups if groups is None else groups:
            bound = self._bound(group)
            params = self._state_params(group)
            if not bound and all(map(len, self._states_of(params))):  # every state made: the usual step
                continue
            for p in params:
                state = self.state[p]
                if state:
                    continue
                # State lives on this rank's shard as plain tensors; state_dict() wraps it for DCP.
                # A bound group's shard is the adapter's stand-in of this rank's rows or elements.
                shard = cast(EngineBinding, self._binding).state_template(p) if bound else local(p)
                if group["kind"] == "adamw":
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(shard, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(shard, dtype=torch.float32, memory_format=torch.preserve_format)
                else:
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                    self._init_matrix_state(shard, state, group, self._views[p])

    def _states_of(self, params: list[torch.Tensor]) -> list[dict]:
        """``[self.state[p] for p in params]``, kept between steps for the same parameters while
        ``self.state`` is the same dict (a load replaces it): each lookup hashes a tensor in Python.
        The kept tuple holds the parameters, so no other tensor can take one's ``id``."""
        key = tuple(map(id, params))
        cache = self.__dict__.setdefault("_states_cache", {})
        held = cache.get(key)
        if held is not None and held[0] is self.state:
            return held[2]
        states = list(map(self.state.__getitem__, params))
        if len(cache) >= 16:  # other subsets (a skipped parameter changes a list for one step)
            cache.clear()
        cache[key] = (self.state, tuple(params), states)
        return states

    # -- step -------------------------------------------------------------------------------
    def _finite_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop parameters whose gradient holds NaN or Inf (on any rank holding part of them).

        A skipped parameter keeps its value, moments, basis and step count for this step.
        """
        if not params:
            return params
        flags = self._nonfinite_flags(params).tolist()
        if not any(flags):
            return params
        if len(flags) != len(params):  # a coarse flag: something is not finite; which parameter, exactly
            flags = self._nonfinite_flags(params, exact=True).tolist()
        keep = []
        for p, flag in zip(params, flags):
            if flag:
                self.record_nonfinite_skip(self._names[p])
            else:
                keep.append(p)
        return keep

    @staticmethod
    def _flags_coarse(params: list[torch.Tensor]) -> bool:
        """Whether :meth:`_nonfinite_flags` flags every parameter when any gradient is not finite
        (CPU gradients: one pass over all of them), leaving which one to a second, exact call."""
        return bool(params) and local(params[0].grad).device.type == "cpu"  # the same on every rank

    def _nonfinite_flags(self, params: list[torch.Tensor], exact: bool = False) -> torch.Tensor:
        """1.0 for each parameter whose gradient holds NaN or Inf on any rank holding part of it, in
        one flag reduction (and one host read by the caller). Unless ``exact``, CPU gradients are
        checked in one pass, and one flag (a 1-element tensor) says whether any is not finite
        (:meth:`_flags_coarse`)."""
        grads = locals_of(list(map(_grad_of, params)))
        # An empty shard has no infinity norm.
        filled = grads if all(map(torch.Tensor.numel, grads)) else [g for g in grads if g.numel()]
        if not exact and self._flags_coarse(params):
            bad = any_nonfinite(filled).reshape(1)
        else:
            if filled and filled[0].is_cuda:  # one multi-tensor kernel; on CPU it is a slow fallback
                norms = iter(torch._foreach_norm(filled, float("inf")))
            else:
                norms = (g.abs().amax() for g in filled)
            peaks = torch.stack([next(norms).float() if g.numel() else g.new_zeros((), dtype=torch.float32) for g in grads])
            bad = (~torch.isfinite(peaks)).float()
        if self._decided_together(params):
            # Every holder of a shard, and every replica whose gradient it averages by projection,
            # must take the same decision; FSDP2 and DDP step all ranks together.
            comm.all_reduce_max(bad, torch.distributed.group.WORLD)
        return bad

    def _decided_together(self, params: list[torch.Tensor]) -> bool:
        """Whether a skip of some of ``params`` must be agreed over the ranks: a DTensor shard, or a
        matrix synced by projection (cached for the same parameters and views)."""
        key = (tuple(map(id, params)), self._views_version)
        cache = self.__dict__.setdefault("_together_cache", {})
        if key not in cache:
            if len(cache) >= 16:
                cache.clear()
            cache[key] = any(is_dtensor(p) or (p in self._views and self._views[p].replicas is not None) for p in params)
        return cache[key]

    def record_nonfinite_skip(self, name: str) -> None:
        """Count a step skipped for a non-finite gradient (warned once per parameter)."""
        if name not in self.nonfinite_skips:
            logger.warning("distopt: non-finite gradient for %s; skipping its update (state untouched)", name)
        self.nonfinite_skips[name] = self.nonfinite_skips.get(name, 0) + 1

    @torch.no_grad()
    def step(self, closure=None):
        if self.__dict__.get("layerwise"):
            raise RuntimeError(
                "this optimizer runs layer-wise (each parameter steps inside backward); do not call step() "
                "as well. Detach it with the handle that distopt.engines.layerwise.attach() returned."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # DeepSpeed calls step() once per parameter group (ZeRO-3: per sub-group) with the others
        # emptied: everything below walks the groups that hold parameters, so a step costs
        # O(groups), not O(groups^2).
        active = [g for g in self.param_groups if g["params"]]
        for group in active:
            if group["kind"] == "matrix" and not self._bound(group) and set(map(torch.Tensor.dim, group["params"])) != {2}:
                for p in group["params"]:
                    if p.dim() != 2:  # an engine swapped in a flat partition after construction
                        raise flat_shard_error(self._names.get(p, "<unnamed>"), tuple(p.shape))
        self.allocate_state(active)
        if self._binding is not None:  # the engine adapter decides the skips of this call's groups at once
            self._binding.begin_step([g for g in active if self._bound(g)])
        own = [g for g in active if not self._bound(g)]
        # One finiteness decision for the gradients of this call: one flag reduction, one host read.
        # Those that a batched step checks itself, on the copy it makes anyway, are left to it.
        with_grads = list(itertools.chain.from_iterable(g["params"] for g in own))
        if not _all_have_grads(with_grads):
            with_grads = [p for p in with_grads if p.grad is not None]
        checked_later = self._checked_in_step(own) if with_grads else frozenset()
        to_check = [p for p in with_grads if id(p) not in checked_later] if checked_later else with_grads
        kept = self._finite_params(to_check)
        finite = None if len(kept) == len(to_check) else set(map(id, kept)) | checked_later
        try:
            with fp32_matmuls():
                for group in active:
                    if self._bound(group):  # the adapter rebuilds rows from the engine's partition
                        cast(EngineBinding, self._binding).step_group(self, group)
                        continue
                    params = group["params"]
                    if finite is not None or not _all_have_grads(params):
                        params = [p for p in params if p.grad is not None and (finite is None or id(p) in finite)]
                    self._step_params(group, params, checked=True)
        finally:
            self._checking_in_step = frozenset()
        self._prepared_lows.clear()
        self.release_averaged()
        return loss

    # Parameters whose finiteness this step's batched path checks itself (see _checked_in_step).
    _checking_in_step: frozenset[int] = frozenset()

    def _checked_in_step(self, groups: list[dict]) -> frozenset[int]:
        """The ``id`` of each parameter of ``groups`` whose step checks its own gradient for NaN and
        Inf (skipping it, as :meth:`_finite_params` would) where it reads it anyway, so step() leaves
        it out of its one check. None by default."""
        return frozenset()

    def _step_params(self, group: dict, params: list[torch.Tensor], checked: bool = False) -> None:
        """Step ``params`` of ``group``; those with a non-finite gradient are skipped unless ``checked``
        says the caller dropped them already."""
        if not checked:
            params = self._finite_params(params)
        if group["kind"] == "adamw":
            self._adamw_step(group, params)
        else:
            with prepared_bases(self._batched_refresh_requests(group, params)):
                self._step_matrices(group, params)

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        """Step a matrix group's parameters (all with finite gradients), one by one by default."""
        for p in params:
            self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])

    # Bytes of full-size fp32 temporaries a batch of matrices may hold (see _step_by_batches).
    coalesce_bytes = 768 << 20

    def _step_by_batches(self, group: dict, params: list[torch.Tensor], batch_key: Callable[[torch.Tensor], Hashable | None],
                         temporaries: int, step_batch: Callable[[dict, list[torch.Tensor], Any], None]) -> None:
        """Step the matrices that share a ``batch_key`` (one process; ``None``: stepped one by one) by
        ``step_batch(group, members, key)``, in runs that hold at most ``coalesce_bytes`` of
        ``temporaries`` full-size fp32 copies of each member."""
        batches: dict[Hashable, list[torch.Tensor]] = {}
        for p in params:
            key = batch_key(p)
            if key is None:
                self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
            else:
                batches.setdefault(key, []).append(p)
        for key, members in batches.items():
            per_batch = max(1, self.coalesce_bytes // (4 * temporaries * local(members[0]).numel()))
            for start in range(0, len(members), per_batch):
                step_batch(group, members[start : start + per_batch], key)

    def _batched_refresh_requests(self, group: dict, params: list[torch.Tensor]) -> list:
        """Refreshes of row-sharded matrices in this step, when there are several to overlap (not those
        clip_grad_norm_ took already)."""
        requests = []
        for p in params:
            view = self._views[p]
            if view.sharded and comm.world_size(view.group) > 1 and view.name not in self._prepared_lows:
                request = self._refresh_request(group, self.state[p], view, local(p.grad))
                if request is not None:
                    requests.append(request)
        return requests if len(requests) > 1 else []

    def _group_of(self, p: torch.Tensor) -> dict:
        """The param group holding ``p`` (an index built once, extended for groups added later)."""
        index = self.__dict__.setdefault("_group_index", {})
        if p not in index:
            index.update({q: g for g in self.param_groups for q in g["params"]})
        return index[p]

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Step one parameter from its current gradient; the layer-wise mode calls it in backward."""
        if p.grad is None:
            return
        group = self._group_of(p)
        if self._bound(group):
            raise RuntimeError("layer-wise stepping is not available for engine-managed (DeepSpeed ZeRO) groups")
        if group["kind"] == "matrix" and p.dim() != 2:
            raise flat_shard_error(self._names.get(p, "<unnamed>"), tuple(p.shape))
        self.allocate_state()
        with fp32_matmuls():
            self._step_params(group, [p])

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        states = self._states_of(params)
        grads = locals_of(list(map(_grad_of, params)))
        self._adamw_apply(group, locals_of(params), grads, states, pack_steps=True)  # this rank's shards

    def _adamw_apply(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
                     pack_steps: bool = False) -> None:
        """Element-wise AdamW on local tensors with their gradients and state dicts (with ``pack_steps``,
        the step counters of the CPU fused kernel's tensors live in one buffer, advanced by one op)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, form = float(group["lr"]), group["eps"], group["weight_decay"], group.get("adam_form", "torch")
        rest: Sequence[int]
        if form == "torch":
            avgs, avg_sqs = list(map(_exp_avg_of, states)), list(map(_exp_avg_sq_of, states))
            if ({*map(_dtype_of, params), *map(_dtype_of, grads)} == {torch.float32}
                    and set(map(_device_type_of, params)) == {"cpu"}
                    and all(map(batching.dense, (params, grads, avgs, avg_sqs)))):  # the usual case, in one pass
                native = fused = list(range(len(params)))
            else:
                native = [i for i, p in enumerate(params) if p.dtype == torch.float32 and grads[i].dtype == torch.float32]
                # On CPU torch's fused kernel (one pass per tensor) where the tensors are dense (a strided one
                # takes the multi-tensor ops, as every tensor does elsewhere; their step counts may stay on
                # the host).
                fused = [i for i in native if params[i].device.type == "cpu" and batching.dense(
                    (params[i], grads[i], avgs[i], avg_sqs[i]))]
            if fused and len(fused) == len(params):
                self._fused_adamw_cpu(params, grads, states, avgs, avg_sqs, lr, beta1, beta2, wd, eps, pack_steps)
            elif fused:
                self._fused_adamw_cpu([params[i] for i in fused], [grads[i] for i in fused], [states[i] for i in fused],
                                      [avgs[i] for i in fused], [avg_sqs[i] for i in fused], lr, beta1, beta2, wd, eps,
                                      pack_steps)
            taken = set(fused)
            multi = [i for i in native if i not in taken] if len(fused) < len(native) else []
            if multi:
                _functional_adamw(
                    [params[i] for i in multi], [grads[i] for i in multi], [avgs[i] for i in multi],
                    [avg_sqs[i] for i in multi], [], [states[i]["step"] for i in multi],
                    foreach=True, fused=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd,
                    eps=eps, maximize=False,
                )
            rest = ([] if len(native) == len(params) else
                    [i for i, p in enumerate(params) if p.dtype != torch.float32 or grads[i].dtype != torch.float32])
        else:
            rest = range(len(params))
        for i in rest:  # fp32 math for low-precision parameters, and the hf form
            p, state, grad = params[i], states[i], grads[i].float()
            state["step"] += 1
            update_moments(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2, form)
            direction, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], int(state["step"]), beta1, beta2, eps, lr, form)
            master = p.float() if p.dtype != torch.float32 else p
            apply_update(master, direction, step_size, lr, wd, form)
            if master is not p:
                p.copy_(master)

    def _fused_adamw_cpu(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
                         avgs: list[torch.Tensor], avg_sqs: list[torch.Tensor], lr: float, beta1: float, beta2: float,
                         weight_decay: float, eps: float, pack_steps: bool) -> None:
        """torch's fused AdamW kernel on dense CPU tensors. With ``pack_steps`` their step counters are
        slices of one buffer (``core.batching``), advanced by one ``add_`` instead of one per tensor."""
        if pack_steps:
            cache = self.__dict__.setdefault("_adamw_steps", {})
            key = tuple(map(id, params))
            packing = cache.get(key)
            if packing is None or not all(map(operator.is_, packing.states, states)):
                if len(cache) >= 16:  # other subsets (a skipped parameter changes the list for one step)
                    cache.clear()
                packing = cache[key] = batching.PackedState(states)
            steps, copied = packing.get("step")
            steps.add_(1)
            if copied:
                packing.store_back("step", steps)
        else:
            torch._foreach_add_([state["step"] for state in states], 1)
        torch._fused_adamw_(params, grads, avgs, avg_sqs, [], list(map(_step_of, states)),
                            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            maximize=False)

    # -- checkpoints ------------------------------------------------------------------------
    def _shape_signature(self) -> list[dict]:
        return [
            {key: group[key] for key in self.shape_hparams if key in group}
            for group in self.param_groups
            if group["kind"] == "matrix"
        ]

    def row_sharded_keys(self, p: torch.Tensor, group: dict) -> dict[str, tuple[int, ...]]:
        """Global shapes of a sharded matrix's row-sharded state tensors (the others are replicated).

        Found by allocating the state on the meta device twice, for the whole matrix and for a
        shard of zero rows: what changes with the row count is row-sharded. The answer depends on
        the algorithm and the global shape only, so every rank agrees.
        """
        cache = self._row_keys_cache
        if p not in cache:
            view = self._views[p]
            full: dict[str, torch.Tensor] = {}
            empty: dict[str, torch.Tensor] = {}
            meta = torch.empty(view.global_shape, device="meta", dtype=torch.float32)
            self._init_matrix_state(meta, full, group, MatrixShardView(view.name, view.global_shape))
            self._init_matrix_state(meta[:0], empty, group, MatrixShardView(view.name, view.global_shape, 0, 0))
            cache[p] = {k: tuple(v.shape) for k, v in full.items() if tuple(v.shape) != tuple(empty[k].shape)}
        return cache[p]

    def _chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        """State tensors split over the shard group in ``torch.chunk`` pieces by rank rather than by
        the matrix's rows (a chunked right basis, column-chunked left-side moments), as
        ``{key: (global shape, split dim)}``. None by default."""
        return {}

    def _distributed_keys(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        """``{key: (global shape, split dim)}`` of every state tensor of a sharded matrix that is
        split across ranks; the others are replicated."""
        rows = {key: (shape, 0) for key, shape in self.row_sharded_keys(p, group).items()}
        return {**rows, **self._chunked_state(p, group)}

    @staticmethod
    def _split_placements(view: MatrixShardView, dim: int) -> tuple:
        """The view's placements with its ``Shard(0)`` moved to ``dim``."""
        from torch.distributed.tensor import Shard

        return tuple(Shard(dim) if isinstance(pl, Shard) else pl for pl in view.placements)

    def _export(self, p: torch.Tensor, group: dict, state: dict) -> dict:
        """Wrap this rank's state of a DTensor parameter into DTensors DCP can reshard."""
        if not is_dtensor(p):
            return dict(state)
        from torch.distributed.tensor import DTensor

        def wrap(t, mesh, placements, shape):
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)

        if group["kind"] == "adamw":
            return {k: (wrap(t, p.device_mesh, p.placements, tuple(p.shape)) if t.dim() else t) for k, t in state.items()}
        view, split = self._views[p], self._distributed_keys(p, group)
        return {k: (wrap(t, view.mesh, self._split_placements(view, split[k][1]), split[k][0]) if k in split and view.sharded else t)
                for k, t in state.items()}

    def _import(self, p: torch.Tensor, group: dict, key: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of a saved state tensor: a DTensor's local shard, or rows of a full tensor."""
        if self._bound(group):
            return cast(EngineBinding, self._binding).import_value(self, p, group, key, value)
        if is_dtensor(value):
            return value.to_local()
        target = self.state[p][key]
        if not is_dtensor(p) or tuple(value.shape) == tuple(target.shape):
            return value
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if group["kind"] == "adamw":
            mesh, placements = p.device_mesh, p.placements
        else:
            view, split = self._views[p], self._distributed_keys(p, group)
            if key not in split:
                return value
            # A DTensor parameter's view carries its mesh.
            mesh, placements = cast("DeviceMesh", view.mesh), self._split_placements(view, split[key][1])
        shape, offset = compute_local_shape_and_global_offset(tuple(value.shape), mesh, placements)
        return value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]

    def state_dict(self) -> dict:
        """Tensors and plain values only, keyed by parameter name; loads with ``weights_only=True``.

        For DTensor (FSDP2) parameters, row-sharded state comes back as DTensors with the
        parameter's placement, so ``torch.distributed.checkpoint`` saves and reshards it.
        """
        self.allocate_state()
        group_of = {p: g for g in self.param_groups for p in self._state_params(g)}
        # Entries keyed by tensors that are not parameters (an engine's lookups) are not state.
        state = {self._names[p]: self._export(p, group_of[p], s) for p, s in self.state.items() if p in group_of}
        groups = []
        for group in self.param_groups:
            saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k not in ("params", "param_names")}
            saved["params"] = list(group["param_names"])
            groups.append(saved)
        meta = {"algorithm": self.algorithm, "format": STATE_FORMAT, "shape_hparams": self._shape_signature()}
        if self._binding is not None:  # where this rank's partitions lie, for resuming and converting
            meta["engine"] = self._binding.describe(self)
        return {"state": state, "param_groups": groups, "distopt": meta}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict.get("distopt")
        if meta is None:
            raise ValueError(
                "this state dict was not written by a distopt optimizer (no 'distopt' entry); "
                "load it into the optimizer class that saved it"
            )
        if meta["algorithm"] != self.algorithm:
            raise ValueError(
                f"checkpoint holds state of optimizer {meta['algorithm']!r}, but this is {self.algorithm!r}; "
                f"build the optimizer with name={meta['algorithm']!r} to resume"
            )
        mine = self._shape_signature()
        if [dict(d) for d in meta["shape_hparams"]] != mine:
            raise ValueError(
                f"checkpoint was written with {meta['shape_hparams']} but this optimizer has {mine}; "
                "these hyper-parameters fix the state shapes, so build the optimizer with the checkpoint's values"
            )
        if self._binding is not None:
            self._binding.check_state_dict(self, state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}")
        by_name = {name: p for p, name in self._names.items()}
        saved_state = state_dict["state"]
        unknown = sorted(set(saved_state) - set(by_name))
        missing = sorted(set(by_name) - set(saved_state))
        if unknown or missing:
            raise ValueError(f"checkpoint parameters do not match: unknown {unknown[:5]}, missing {missing[:5]}")
        for group, saved in zip(self.param_groups, saved_groups):
            if list(saved["params"]) != list(group["param_names"]):
                raise ValueError("checkpoint parameter groups list different parameters")
        # Everything is checked before anything is copied: a refused checkpoint leaves no trace.
        self.allocate_state()
        group_of = {p: g for g in self.param_groups for p in self._state_params(g)}
        incoming = []
        for name, entries in saved_state.items():
            p = by_name[name]
            target = self.state[p]
            if set(entries) != set(target):
                raise ValueError(f"{name}: checkpoint state keys {sorted(entries)} differ from {sorted(target)}")
            for key, value in entries.items():
                value = self._import(p, group_of[p], key, value)
                if tuple(value.shape) != tuple(target[key].shape):
                    raise ValueError(f"{name}.{key}: checkpoint shape {tuple(value.shape)} != {tuple(target[key].shape)}")
                incoming.append((target[key], value))
        for target, value in incoming:
            target.copy_(value)
        self.resumed_changes = self._keep_current_hparams(saved_groups)

    # Group entries that are bookkeeping, not hyper-parameters (``lr`` is owned by schedules).
    _NOT_HPARAMS = frozenset({"params", "param_names", "kind", "roles", "lr", "initial_lr"})

    def _keep_current_hparams(self, saved_groups: list[dict]) -> list[str]:
        """The hyper-parameters this optimizer was built with stay in force after a load; entries only
        the checkpoint has are taken from it. Returns (and logs) what differs from the checkpoint."""
        changes = []
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key == "params" or key in self.layout_hparams:
                    continue
                if key in RENAMED_HPARAMS and key not in group:  # written before the rename
                    key = RENAMED_HPARAMS[key]
                if key not in group:
                    group[key] = value
                elif key not in self._NOT_HPARAMS and not _same_value(group[key], value):
                    changes.append(f"{group['kind']} group {key}: {value!r} in the checkpoint -> {group[key]!r} now (applied)")
        for change in changes:
            logger.warning("load_state_dict: %s", change)
        return changes


# Hyper-parameters under their old names: accepted by the builders (with a warning) and in checkpoints.
RENAMED_HPARAMS = {"init": "refresh", "galore_refresh": "refresh"}


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every optimizer-state tensor this rank holds, projection matrices included (also
    those an algorithm keeps in the model: ``projections_in_model()``).

    Counts whole storages, deduplicated, so a state tensor that is a view of a larger buffer (a
    leaked ``U`` of an SVD, say) is charged for the buffer it keeps alive. Works for any
    ``torch.optim.Optimizer``, including state held inside helper objects.
    """
    seen: dict[int, int] = {}

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            local = getattr(value, "_local_tensor", value)
            storage = local.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth)
        elif depth < 2 and hasattr(value, "__dict__"):
            for v in vars(value).values():
                visit(v, depth + 1)

    for state in optimizer.state.values():
        visit(state)
    # Projections the algorithm keeps in the model (RSO's partitioned P): this rank's part.
    held = getattr(optimizer, "projections_in_model", None)
    if callable(held):
        visit(list(held().values()))
    return sum(seen.values())
