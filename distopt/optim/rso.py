"""RSO: randomized subspace optimization (Chen, Zhang, Liu, Yuan, Wen; ICML 2025).

Each attention/MLP linear becomes ``y = x W^T + (x P) B``: ``W`` frozen, ``P`` a random
``in x r`` matrix, ``B`` (``r x out``) the only trained factor, stored transposed as an ``out x r``
parameter so that FSDP2 splits its rows exactly like ``W``'s. Every ``tau`` steps the increment is
merged (``W += (P B)^T = B^T P^T``, row by row), ``B`` restarts from zero with a new ``P`` and fresh
Adam states.

Where ``P`` lives (``state_layout``):

- ``partitioned`` (the default): ``P`` is a frozen parameter of the layer (``rso_p``). FSDP2 splits
  its ``in`` rows over the shard group like any weight and all-gathers it just in time for forward
  and backward, with its prefetch; a rank keeps ``in/N x r``. A merge all-gathers the current ``P``
  once.
- ``replicated``: ``P`` is a buffer of the layer, whole on every rank: no collective at all,
  ``in x r`` per rank.

Either way ``P`` is in the model's state dict under the same name, so a checkpoint resumes under
the other layout, and ``state_bytes`` counts the part of it a rank holds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..core import batching
from ..core.linalg import haar_basis, seeded_gaussian, stable_seed
from ..core.options import check_option
from ..core.routing import LINEAR_ROLES, assign_roles
from ..core.schedule import is_refresh_step, refresh_index, refresh_phase
from ..core.shard import MatrixShardView, is_dtensor, local
from .base import SubspaceOptimizer, adam_direction, apply_update, check_common_hparams

PROJECTIONS = ("haar", "gaussian")
STATE_LAYOUTS = ("partitioned", "replicated")
DEFAULT_RANK = 128
DEFAULT_PROJECTION = "haar"
DEFAULT_SCALE = 1.0
DEFAULT_SEED = 0


def sample_projection(in_features: int, rank: int, kind: str, scale: float, seed: int, device=None) -> torch.Tensor:
    """``P`` (``in x r``, fp32) with ``P^T P = (in/r) I`` (``haar``) or i.i.d. ``N(0, 1/r)`` entries
    (``gaussian``, the same in expectation), times ``scale``; ``E[P P^T] = scale^2 I`` either way."""
    if kind == "haar":
        proj = haar_basis(in_features, rank, seed, device) * math.sqrt(in_features / rank)
    else:
        proj = seeded_gaussian((in_features, rank), seed, device) / math.sqrt(rank)
    return proj * scale if scale != 1 else proj


class _SubspaceLinearFn(torch.autograd.Function):
    """``y = x W^T + (x P) B`` saving only ``x P`` besides the weights.

    ``factor`` is ``B^T`` (``out x r``). Its gradient is ``dy^T (x P)``: the ``r x out`` gradient
    ``(x P)^T dy`` of ``B``, transposed. The input gradient ``dy W + (dy B^T) P^T`` needs weights
    only, so no ``s x in`` activation is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, proj, factor):
        xp = x @ proj.to(x.dtype)
        y = F.linear(x, weight) + F.linear(xp, factor.to(x.dtype))
        ctx.save_for_backward(xp, weight, proj, factor)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xp, weight, proj, factor = ctx.saved_tensors
        grad_x = grad_factor = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype) + (grad_out @ factor.to(grad_out.dtype)) @ proj.T.to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_factor = (grad_out.reshape(-1, grad_out.shape[-1]).T @ xp.reshape(-1, xp.shape[-1])).to(factor.dtype)
        return grad_x, None, None, grad_factor


class SubspaceLinear(nn.Module):
    """A linear layer reparametrized for RSO: frozen ``weight`` plus ``(x P) B``.

    ``weight`` (``out x in``) keeps the Linear's name and place in the state dict and has
    ``requires_grad=False``. ``rso_b`` is the trained factor ``B`` (``r x out``) stored transposed,
    as an ``out x r`` parameter: its rows pair with ``weight``'s rows, so a row split of the layer
    (FSDP2's ``Shard(0)``) gives each rank matching rows of both. ``rso_p`` (``in x r``, the weight's
    dtype) is a frozen parameter (``partitioned=True``: FSDP2 shards and gathers it like ``weight``)
    or a buffer, whole on every rank (``partitioned=False``); both are in the model's state dict.
    """

    def __init__(self, linear: nn.Linear, proj: torch.Tensor, partitioned: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        w = linear.weight
        self.rso_b = nn.Parameter(torch.zeros(self.out_features, proj.shape[1], dtype=w.dtype, device=w.device))
        proj = proj.to(w.dtype).contiguous()  # FSDP2 shards contiguous tensors only
        if partitioned:
            self.rso_p = nn.Parameter(proj, requires_grad=False)
        else:
            self.register_buffer("rso_p", proj)
        self.rso_sampling: tuple | None = None  # (projection, scale, seed) of P, when reparametrize drew it

    @property
    def partitioned(self) -> bool:
        """Whether ``P`` is a parameter of the layer (sharded by FSDP2) rather than a buffer."""
        return isinstance(self.rso_p, nn.Parameter)

    def projection(self) -> torch.Tensor:
        """The whole ``P`` (all-gathered when the layer is sharded: a collective over its mesh)."""
        proj = self.rso_p
        return proj.full_tensor() if is_dtensor(proj) else proj

    @property
    def rank(self) -> int:
        return self.rso_b.shape[1]

    def forward(self, x):
        y = _SubspaceLinearFn.apply(x, self.weight, self.rso_p, self.rso_b)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + (P B)^T = W + B^T P^T`` in fp32: the weight of the equivalent plain Linear.

        On a sharded layer (FSDP2, outside forward) each rank computes its own rows and the
        result is a DTensor with the weight's placement; ``.full_tensor()`` gathers it. A sharded
        ``P`` is all-gathered, so every rank of the mesh must call this."""
        merged = local(self.weight).float() + local(self.rso_b).float() @ self.projection().float().T
        if not is_dtensor(self.weight):
            return merged
        from torch.distributed.tensor import DTensor

        w = self.weight
        return DTensor.from_local(merged, w.device_mesh, w.placements, run_check=False,
                                  shape=w.shape, stride=w.stride())

    def extra_repr(self) -> str:
        layout = "partitioned" if self.partitioned else "replicated"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, P {layout}"


def subspace_linears(model: nn.Module) -> list[SubspaceLinear]:
    return [m for m in model.modules() if isinstance(m, SubspaceLinear)]


@torch.no_grad()
def unwrap(model: nn.Module) -> nn.Module:
    """Replace every :class:`SubspaceLinear` by a plain ``nn.Linear`` holding ``W + (P B)^T``."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SubspaceLinear)]
    for name, module in layers:
        if is_dtensor(module.weight):
            raise ValueError(
                f"{name}: unwrap needs unsharded layers, and this one is sharded (FSDP2). Gather each "
                "layer's module.merged_weight().full_tensor(), or unwrap a model loaded from a full state dict."
            )
    for name, module in layers:
        parent, _, child = name.rpartition(".")
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        linear.weight.copy_(module.merged_weight())
        if module.bias is not None:
            linear.bias = module.bias
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


_dtype = operator.attrgetter("dtype")


@dataclasses.dataclass
class _FusedFactors:
    """Factors on one device whose inner steps take one fused kernel call, with what a step reads."""

    params: list[torch.Tensor]
    states: list[dict]
    views: list[MatrixShardView]
    phases: list[int]
    packing: batching.PackedState


def _check_rso_hparams(group: dict) -> None:
    check_option(group, "rank", "int", low=1, note="the subspace rank, e.g. rank=128")
    check_option(group, "projection", "choice", choices=PROJECTIONS)
    check_option(group, "scale", low=0, low_open=True)
    check_option(group, "update_proj_gap", "int", low=1, note="tau, e.g. 200")
    check_option(group, "prox", low=0, note="the proximal weight 1/eta")
    if "state_layout" in group:
        check_option(group, "state_layout", "choice", choices=STATE_LAYOUTS)


class RSO(SubspaceOptimizer):
    r"""Randomized subspace optimization: Adam on a random rank-``r`` increment of each linear layer,
    merged into the frozen weight every ``tau`` steps.

    For a linear layer with frozen weight ``W`` (``out x in``; the paper's ``X = W^T``, ``m = in``,
    ``n = out``), outer iteration ``k`` solves approximately, with ``tau`` Adam steps from ``B = 0``,

    .. math::
        \begin{aligned}
        &\min_{B \in \mathbb R^{r\times n}} f\big(X_k + P_k B\big) + \frac{\mu}{2}\|B\|_F^2,\qquad
          g = \nabla_B f + \mu B = (x P_k)^\top \frac{\partial f}{\partial y} + \mu B\\
        &M \leftarrow \beta_1 M + (1-\beta_1) g,\quad V \leftarrow \beta_2 V + (1-\beta_2) g^2,\quad
          B \leftarrow B(1-\eta\lambda) - \eta\,\frac{M/(1-\beta_1^{i})}{\sqrt{V/(1-\beta_2^{i})}+\epsilon}
          \quad (i = \text{inner step})\\
        &\text{after the last inner step: } X_{k+1} = X_k + P_k B\ (W \mathrel{+}= (P_k B)^\top),\quad
          B \leftarrow 0,\ M, V \leftarrow 0,\ P_{k+1} \text{ sampled}
        \end{aligned}

    ``mu`` is ``prox`` (the paper's ``1/eta_k``). The layer computes ``y = x W^T + (x P) B`` through a
    custom autograd function: ``W`` has no gradient, ``B``'s gradient is ``r x out`` (the parameter
    ``rso_b`` holds ``B^T``, ``out x r``, so its ``.grad`` is that gradient transposed; Adam is
    element-wise, so the layout changes nothing) and the only saved activation is ``x P``
    (``s x r``), not ``x`` (``s x in``). Non-linear parameters (embeddings, LM head, norms, biases)
    train with AdamW as usual.

    :meth:`prepare_model` (called by ``build_optimizer``) replaces, in place, every ``nn.Linear``
    whose weight the default routing rules give an attention/MLP role by a :class:`SubspaceLinear`
    and samples its first ``P``. ``unwrap(model)`` turns them back into plain Linears.

    FSDP2: ``fully_shard`` cannot take parameters added after it ran, so reparametrize first,
    then shard, then build with the same hyper-parameters::

        reparametrize(model, rank=128)           # distopt.optim.rso.reparametrize
        fully_shard(...)                         # per block, then the root
        opt = distopt.build_optimizer(model, "rso", rank=128)

    ``W`` and ``B^T`` have ``out`` rows each and are split alike (``torch.chunk`` over the same
    mesh), so Adam on ``B^T``'s rows and the merge ``W[rows] += B^T[rows] P^T`` only use this rank's
    rows and the whole ``P``. With ``state_layout="partitioned"`` (the default) ``P`` is a frozen
    parameter that FSDP2 shards by its ``in`` rows and gathers for forward and backward like ``W``;
    the merge all-gathers it once (every ``tau`` steps per layer). ``"replicated"`` keeps ``P`` a whole
    buffer on every rank and the merge issues no collective. Both draw the same ``P`` (same seed on
    every rank) and give the same numbers.

    Defaults: ``lr=1e-3``, ``rank=128``, ``update_proj_gap=200`` (``tau``), ``projection="haar"``,
    ``scale=1``, ``prox=0``, ``stagger=True``, ``state_layout="partitioned"``.

    Choices where the paper is silent or where we differ, deliberately:
    - ``P = sqrt(in/r) Q`` with ``Q`` Haar (``P^T P = (in/r) I``, ``E[P P^T] = I``: the paper's
      Assumption 5.3 exactly); ``projection="gaussian"`` draws i.i.d. ``N(0, 1/r)`` entries, which
      reportedly is what its experiments used. With either, one Adam step on ``B`` moves ``W`` by about
      ``lr sqrt(in * out)``, like full Adam, so use an Adam learning rate, not GaLore's.
    - Fresh inner states: moments are zeroed at each merge and bias correction counts inner steps,
      as a new Adam run on a new subproblem would (the paper does not say).
    - ``weight_decay`` decays the effective weight ``W + (P B)^T``: both ``W`` and ``B`` are scaled.
    - Merges are staggered over ``tau`` by a hash of the parameter name; the merge happens at the end
      of an outer iteration's last step, so the next forward already uses the new ``P``.
    - ``P`` is seeded by ``(seed, factor name, outer index)`` and held by the layer, in the weight's
      dtype (the forward computes with it in the compute dtype anyway). It is the optimizer's memory:
      ``state_bytes`` counts this rank's part of it. Only ``nn.Linear`` modules are reparametrized,
      chosen by the default routing rules (``build_optimizer``'s ``rules`` do not reach them).

    State per factor ``B`` of a layer ``out x in`` with rank ``r`` (``min(rank, in)``): ``step``
    (int64) + ``exp_avg``, ``exp_avg_sq`` (out x r, laid out like ``rso_b``; row-sharded under
    FSDP2), fp32, + ``P`` (in x r, the weight's dtype; row-sharded under FSDP2 when partitioned, whole
    when replicated). One fp32 process: ``8 + 4 (2 r out + in r)`` bytes. The frozen ``W`` is a model
    tensor, not optimizer state.

    A step's inner Adam steps are one call of torch's fused Adam kernel for all factors (fused
    AdamW; fused Adam with ``prox`` as its L2 term), in one process and on FSDP2 shards alike, with
    each factor's own inner count in its bias corrections; the frozen weights decay in one
    multi-tensor call. One by one: the merges (a matmul each, and a gather of a partitioned ``P``),
    the ``hf`` form, factors that are not dense fp32, and ``prox`` together with ``weight_decay``
    (one kernel applies one of the two).
    """

    algorithm = "rso"
    matrix_roles: frozenset = frozenset()  # factors are routed by identity, not by name
    shape_hparams = ("rank",)

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank: int = DEFAULT_RANK,
        update_proj_gap: int = 200,
        projection: str = DEFAULT_PROJECTION,
        scale: float = DEFAULT_SCALE,
        prox: float = 0.0,
        stagger: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adam_form: str = "torch",
        seed: int = DEFAULT_SEED,
        state_layout: str = "partitioned",
        factors: list[SubspaceLinear] | None = None,
    ):
        self._owners: dict[int, SubspaceLinear] = {id(module.rso_b): module for module in factors or ()}
        defaults = dict(
            lr=lr, rank=rank, update_proj_gap=update_proj_gap, projection=projection, scale=scale, prox=prox,
            stagger=stagger, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_form=adam_form, seed=seed,
            state_layout=state_layout,
        )
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        super().__init__(self._route_factors(self._split_unnamed(groups)), defaults)
        # By name from here on: the base hands steps this rank's local tensor, not the Parameter.
        self._owner_by_name = {self._names[p]: m for p in self._names if (m := self._owners.get(id(p))) is not None}

    def _route_factors(self, groups: list[dict]) -> list[dict]:
        """Factors of :class:`SubspaceLinear` layers form the matrix group; all else is element-wise."""
        out, factors = [], []
        for group in groups:
            params, names = list(group["params"]), list(group["param_names"])
            roles = list(group.get("roles") or ["other"] * len(params))
            keep = [i for i, p in enumerate(params) if id(p) not in self._owners]
            factors += [(params[i], names[i]) for i in range(len(params)) if id(params[i]) in self._owners]
            if keep:
                out.append({**group, "kind": "adamw", "params": [params[i] for i in keep],
                            "param_names": [names[i] for i in keep], "roles": [roles[i] for i in keep]})
        if factors:
            out.append({"params": [p for p, _ in factors], "param_names": [n for _, n in factors],
                        "kind": "matrix", "roles": ["matrix"] * len(factors)})
        if not factors and not self._owners:
            raise ValueError(
                "RSO found no reparametrized layers: build it with distopt.build_optimizer(model, 'rso', ...), "
                "or pass factors=distopt.optim.rso.subspace_linears(model) after "
                "distopt.optim.rso.reparametrize(model, ...)"
            )
        return out

    # -- model surgery -------------------------------------------------------------------------
    @classmethod
    def _config(cls, hparams: dict) -> dict:
        """Every hyper-parameter, defaults filled in, validated (before the model is touched)."""
        signature = inspect.signature(cls.__init__).parameters
        defaults = {k: v.default for k, v in signature.items() if v.default is not inspect.Parameter.empty}
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"RSO got unexpected keyword argument(s) {unknown}; it takes {sorted(defaults)}")
        config = {**defaults, **hparams}
        check_common_hparams({**config, "betas": tuple(config["betas"])})
        _check_rso_hparams(config)
        return config

    @classmethod
    @torch.no_grad()
    def reparametrize(cls, model: nn.Module, **hparams) -> nn.Module:
        """Swap, in place, attention/MLP ``nn.Linear`` layers for :class:`SubspaceLinear` (each with its
        first ``P``) and return ``model``. Takes RSO's keyword arguments (``rank``, ``projection``,
        ``scale`` and ``seed`` shape the layers; the others are only validated).

        ``build_optimizer(model, "rso", ...)`` does this itself; call it yourself before FSDP2's
        ``fully_shard``, which has to see the new factors. Layers already swapped are kept (their
        rank and ``P`` sampling must match), so the build that follows finds them.
        """
        config = cls._config(hparams)
        rank, projection, scale, seed = config["rank"], config["projection"], config["scale"], config["seed"]
        sampling = (projection, float(scale), seed)
        partitioned = config["state_layout"] == "partitioned"
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        roles = assign_roles(names)
        targets = []
        for name, module in model.named_modules():
            if isinstance(module, SubspaceLinear):
                r = min(rank, module.in_features)
                if module.rank != r or module.rso_sampling not in (None, sampling):
                    raise ValueError(
                        f"{name} was reparametrized with rank {module.rank} and P sampling "
                        f"(projection, scale, seed)={module.rso_sampling}, but RSO here has rank {r} (min(rank, in)) "
                        f"and {sampling}: pass reparametrize() and build_optimizer() the same rank, projection, "
                        "scale and seed"
                    )
                if module.partitioned != partitioned:
                    have = "partitioned" if module.partitioned else "replicated"
                    raise ValueError(
                        f"{name} was reparametrized with state_layout={have!r} (P "
                        f"{'a parameter of the layer' if module.partitioned else 'an optimizer buffer'}), but RSO here "
                        f"has state_layout={config['state_layout']!r}: pass reparametrize() and build_optimizer() the "
                        "same state_layout"
                    )
            elif isinstance(module, nn.Linear) and roles.get(f"{name}.weight" if name else "weight") in LINEAR_ROLES:
                if is_dtensor(module.weight):
                    raise ValueError(
                        f"{name or 'model'} is already sharded (its weight is a DTensor, as after FSDP2 fully_shard). "
                        "RSO swaps each attention/MLP Linear for a SubspaceLinear with a new trained factor, and "
                        "FSDP2 only shards parameters that exist when fully_shard runs. Call "
                        "distopt.optim.rso.reparametrize(model, rank=..., ...) before fully_shard, then "
                        "distopt.build_optimizer(model, 'rso', ...) with the same hyper-parameters."
                    )
                if type(module) is nn.Linear and module.weight.numel() > 0:  # an empty layer has nothing to train
                    targets.append((name, module))
        for name, module in targets:
            r = min(rank, module.in_features)
            factor_name = f"{name}.rso_b" if name else "rso_b"
            proj = sample_projection(module.in_features, r, projection, scale,
                                     stable_seed(seed, factor_name, 0, "rso"), module.weight.device)
            layer = SubspaceLinear(module, proj, partitioned)
            layer.rso_sampling = sampling
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        return model

    @classmethod
    def prepare_model(cls, model: nn.Module, hparams: dict) -> dict:
        cls.reparametrize(model, **hparams)
        return {**hparams, "factors": subspace_linears(model)}

    # -- validation and state --------------------------------------------------------------------
    def _check_matrix_hparams(self, group: dict) -> None:
        _check_rso_hparams(group)
        for p in group["params"]:
            if id(p) not in self._owners:
                raise ValueError("RSO's matrix group may only hold factors of its reparametrized layers")

    def owner(self, name: str) -> SubspaceLinear:
        """The layer whose factor is the parameter called ``name``."""
        return self._owner_by_name[name]

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        shape = (view.local_rows, view.n)  # this rank's rows of B^T, from the view (p may be a whole meta tensor)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def projections_in_model(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{factor: P}``: the optimizer's projections, which the layers hold (a sharded parameter
        or a whole buffer, by ``state_layout``). ``state_bytes`` counts this rank's part of them."""
        return {p: self.owner(self._names[p]).rso_p
                for group in self.param_groups if group["kind"] == "matrix" for p in group["params"]}

    @staticmethod
    def _set_projection(module: SubspaceLinear, whole: torch.Tensor) -> None:
        """Write a whole ``P`` into the layer (this rank's part when it is sharded)."""
        if is_dtensor(module.rso_p):
            from torch.distributed.tensor import distribute_tensor

            # Every rank has the whole P: keep this rank's part, no communication.
            mine = distribute_tensor(whole.to(local(module.rso_p).device), module.rso_p.device_mesh,
                                     module.rso_p.placements, src_data_rank=None)
            local(module.rso_p).copy_(mine.to_local())
        else:
            module.rso_p.copy_(whole)

    @staticmethod
    def inner_step(step: int, gap: int, phase: int) -> int:
        """1-based index of ``step`` inside its outer iteration (outer iterations start at step 0 and
        at every ``s`` with ``(s + phase) % gap == 0``)."""
        return step - max(step - (step + phase) % gap, 0) + 1

    # -- step -------------------------------------------------------------------------------------
    @staticmethod
    def frozen_rows(module: SubspaceLinear, p: torch.Tensor, view: MatrixShardView) -> torch.Tensor:
        """This rank's rows of the layer's frozen ``W``, which pair with the rows ``p`` holds of ``B^T``.

        Under FSDP2 both are ``Shard(0)`` over the same mesh with ``out`` rows, so their local
        shards cover the same rows ``[view.row_start, view.row_end)``; otherwise both are whole.
        """
        weight = local(module.weight)
        if weight.shape[0] != p.shape[0] or p.shape[0] != view.local_rows:
            raise RuntimeError(
                f"{view.name}: this rank holds {p.shape[0]} rows of B^T but {weight.shape[0]} rows of "
                f"{view.name[:-len('rso_b')]}weight (expected {view.local_rows}); RSO needs both row-sharded "
                "alike, as fully_shard does for the parameters of one module, and W sharded between steps"
            )
        return weight

    # -- inner steps of many factors in one kernel -------------------------------------------------
    def _fused_plan(self, group: dict, params: list[torch.Tensor]) -> tuple[list[_FusedFactors], list[torch.Tensor]]:
        """The factors whose inner step is torch's fused Adam(W) step as it is, by device, and the rest:
        the ``torch`` form, dense nonempty fp32 factors and moments, and at most one of ``prox``
        (coupled: Adam's L2 term) and ``weight_decay`` (decoupled: AdamW's), since one kernel applies
        one of them (a device without the kernel is found on the first call). Cached for the same parameters, views and settings (a load
        copies into the state tensors; :class:`~distopt.core.batching.PackedState` checks them)."""
        gap, stagger = group["update_proj_gap"], group["stagger"]
        key = (id(group), tuple(map(id, params)), self._views_version, group["adam_form"], bool(group["prox"]),
               bool(group["weight_decay"]), gap, stagger)
        cache = self.__dict__.setdefault("_fused_plans", {})
        hit = cache.get(key)
        if hit is not None:
            return hit
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        rest: list[torch.Tensor] = []
        for p in params:
            w, state = local(p), self.state[p]
            fusable = (group["adam_form"] == "torch" and not (group["prox"] and group["weight_decay"])
                       and w.numel() > 0 and w.dtype == torch.float32
                       and batching.dense((w, state["exp_avg"], state["exp_avg_sq"])))
            (by_device.setdefault(w.device, []) if fusable else rest).append(p)
        plans = []
        for members in by_device.values():
            states, views = [self.state[p] for p in members], [self._views[p] for p in members]
            plans.append(_FusedFactors(members, states, views, [refresh_phase(v.name, gap, stagger) for v in views],
                                       batching.PackedState(states)))
        if len(cache) >= 16:  # other subsets (a skipped factor changes the list for one step)
            cache.clear()
        cache[key] = plans, rest
        return plans, rest

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        """Inner steps of the factors :meth:`_fused_plan` takes, by device, in one fused kernel (in one
        process and on FSDP2 shards alike: an inner step is element-wise, with no collective), the
        frozen weights' decay in one multi-tensor call, every other factor one by one; then the merges
        due, in the parameters' order on every rank (a partitioned ``P`` is gathered for each, and a
        rank's empty shard is not fusable where the others' are)."""
        plans, rest = self._fused_plan(group, params)
        gap = group["update_proj_gap"]
        due: dict[int, tuple[int, int]] = {}  # id -> (steps made, phase) of the factors whose merge is due
        for plan in plans:
            made = self._fused_inner_steps(group, plan)
            if made is None:
                rest = rest + plan.params
            else:
                due.update(made)
        for p in rest:
            view, state = self._views[p], self.state[p]
            self._inner_step(local(p), local(p.grad), state, group, view)
            done, phase = int(state["step"]), refresh_phase(view.name, gap, group["stagger"])
            if is_refresh_step(done, gap, phase):
                due[id(p)] = done, phase
        if due:
            for p in params:
                if id(p) in due:
                    done, phase = due[id(p)]
                    self.merge(local(p), self.state[p], group, self._views[p], refresh_index(done, gap, phase))

    def _fused_inner_steps(self, group: dict, plan: _FusedFactors) -> dict[int, tuple[int, int]] | None:
        """:meth:`_inner_step` of ``plan``'s factors (one device) with one kernel for their Adam steps:
        the same update, rounded as torch's fused AdamW rounds it; ``{id: (steps made, phase)}`` of
        those whose merge is due. None, with nothing written, where the kernel cannot take them (the
        device lacks it, or a gradient or weight is not dense: the kernel walks each tensor as one
        block)."""
        gap, (beta1, beta2) = group["update_proj_gap"], group["betas"]
        lr, wd, prox = float(group["lr"]), group["weight_decay"], group["prox"]
        grads, weights = [local(p.grad) for p in plan.params], list(map(local, plan.params))
        # Checked on every step, not cached: a weight re-pointed to a strided view would be written
        # between its strides.
        if (not batching.dense(grads) or not batching.dense(weights)
                or not all(map(torch.float32.__eq__, map(_dtype, grads)))):
            return None
        steps, copied = plan.packing.get("step")
        done = steps.tolist()  # one host read for all
        # The bias corrections count inner steps (float counts: the kernel misreads int64 ones).
        counts = torch.tensor([float(self.inner_step(step, gap, phase)) for step, phase in zip(done, plan.phases)],
                              dtype=torch.float32).to(weights[0].device, non_blocking=True)
        kernel = torch._fused_adam_ if prox else torch._fused_adamw_  # prox: Adam's coupled L2 term
        if not batching.fused_adam(kernel, weights[0].device.type, weights, grads, [s["exp_avg"] for s in plan.states],
                                   [s["exp_avg_sq"] for s in plan.states], [], list(counts.unbind(0)), lr=lr,
                                   beta1=beta1, beta2=beta2, weight_decay=prox or wd, eps=group["eps"], amsgrad=False,
                                   maximize=False):
            return None
        steps.add_(1)
        if copied:
            plan.packing.store_back("step", steps)
        if wd:
            torch._foreach_mul_([self.frozen_rows(self.owner(view.name), w, view) for w, view in zip(weights, plan.views)],
                                1.0 - lr * wd)
        return {id(p): (step + 1, phase) for p, step, phase in zip(plan.params, done, plan.phases)
                if is_refresh_step(step + 1, gap, phase)}

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        self._inner_step(p, grad, state, group, view)
        gap = group["update_proj_gap"]
        self._merge_if_due(p, state, group, view, int(state["step"]), refresh_phase(view.name, gap, group["stagger"]))

    def _merge_if_due(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView, done: int, phase: int) -> None:
        """:meth:`merge` after the inner step that made ``done`` steps, where it ends an outer iteration."""
        if is_refresh_step(done, group["update_proj_gap"], phase):
            self.merge(p, state, group, view, refresh_index(done, group["update_proj_gap"], phase))

    def _inner_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        """One Adam step of the factor ``p`` (and the frozen weight's decay), without the merge."""
        module = self.owner(view.name)
        gap = group["update_proj_gap"]
        phase = refresh_phase(view.name, gap, group["stagger"])
        step = int(state["step"])
        inner = self.inner_step(step, gap, phase)
        beta1, beta2 = group["betas"]
        lr, wd, form = float(group["lr"]), group["weight_decay"], group["adam_form"]
        master = p.float() if p.dtype != torch.float32 else p
        g = grad.float()
        if group["prox"]:
            g = g + group["prox"] * master
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["step"] += 1
        direction, step_size = adam_direction(exp_avg, exp_avg_sq, inner, beta1, beta2, group["eps"], lr, form)
        if wd:
            self.frozen_rows(module, p, view).mul_(1.0 - lr * wd)
        apply_update(master, direction, step_size, lr, wd, form)
        if master is not p:
            p.copy_(master)

    @torch.no_grad()
    def merge(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView, index: int) -> None:
        """End an outer iteration: ``W += (P B)^T``, ``B = 0``, fresh moments, ``P`` for outer ``index``.

        ``p`` is this rank's rows of ``B^T``, so ``W[rows] += B^T[rows] P^T`` needs the whole ``P``
        and nothing else from other ranks (a sharded ``P`` is all-gathered once); every rank draws
        the same next ``P`` and keeps its part."""
        module = self.owner(view.name)
        proj = module.projection()
        weight = self.frozen_rows(module, p, view)
        weight.copy_(weight.float().add_(p.float() @ proj.float().T))
        p.zero_()
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        seed = stable_seed(group["seed"], view.name, index, "rso")
        fresh = sample_projection(proj.shape[0], proj.shape[1], group["projection"], group["scale"], seed, proj.device)
        self._set_projection(module, fresh)


def reparametrize(model: nn.Module, **hparams) -> nn.Module:
    """Swap ``model``'s attention/MLP linears for :class:`SubspaceLinear` layers, in place, and return
    it: :meth:`RSO.reparametrize`. Call it before FSDP2's ``fully_shard`` with the keyword arguments
    ``build_optimizer(model, "rso", ...)`` will get."""
    return RSO.reparametrize(model, **hparams)
