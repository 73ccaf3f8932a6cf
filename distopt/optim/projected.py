"""Shared machinery of the subspace-Adam family whose algorithms differ only in how the basis moves.

GoLore, GrassJump, GrassWalk and SubTrack all run Adam on ``R = proj(G)`` in a rank-``r`` basis,
optionally add Fira's recovery-scaled residual, and change the basis on a staggered schedule. This
module holds that loop once; each algorithm file implements :meth:`ProjectedAdam._new_basis`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from ..core import batching, comm, subspace
from ..core.linalg import stable_seed
from ..core.moments import apply_moment_policy
from ..core.options import check_option
from ..core.projector import (
    RangeRequest,
    SvdRequest,
    add_back,
    change_of_basis,
    compute_basis,
    prepared_bases,
    products_in,
    project_back,
    project_local,
    random_basis,
    scaled_back,
    unseen_fraction,
)
from ..core.recovery import (
    channel_ratio,
    check_recovery_hparams,
    limited,
    limited_batch_,
    recovery_term,
    scaled_residual,
    scaled_residual_,
)
from ..core.routing import LINEAR_ROLES
from ..core.schedule import refresh_index, refresh_residue
from ..core.shard import MatrixShardView, is_dtensor, local
from .base import SubspaceOptimizer, _dtype_of, _grad_of, adam_direction, apply_update, tf32_matmuls, update_moments

PROJECTION_PRECISIONS = ("fp32", "tf32", "bf16")
# Devices whose batches check their own stacked gradients for NaN and Inf, with one host read each:
# the CPU, where nothing waits for a device. Elsewhere step()'s one check for all, one host read a step.
SELF_CHECKING_DEVICES = frozenset({"cpu"})
# Devices whose batch temporaries live in buffers kept between steps (:meth:`ProjectedAdam._scratch`):
# the CPU, where a fresh host allocation is page-faulted every step. Elsewhere each op allocates its
# own result from the caching allocator, with no separate allocation op.
CACHED_SCRATCH_DEVICES = frozenset({"cpu"})


def _by_count(counts: list[int]):
    """How a batch's tensors go to a fused Adam call: whole when its moment counts agree (one count
    tensor), else as its matrices, with a count each."""
    return (lambda t: [t]) if min(counts) == max(counts) else (lambda t: list(t.unbind(0)))


def projection_matmuls(group: dict):
    """The precision of ``proj(G)``, ``back(N)`` and Fira's ``back(R)``: fp32 by default; ``tf32``
    lets those matmuls run on TF32 tensor cores (CUDA), ``bf16`` gives them bf16 operands with fp32
    accumulation (``core.projector.products_in``). Never a refresh: its Gram and range finder stay
    fp32."""
    precision = group["projection_precision"]
    if precision == "tf32":
        return tf32_matmuls(True)
    return products_in(torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _adam_batch_math(avg, avg_sq, low, beta1: float, beta2: float, eps: float, bias2, coef):
    """Adam's moments of a batch's projections ``low`` (updated in place) and its direction
    ``M / (sqrt(V) / c_2 + eps)``, returned with it scaled by ``coef`` (per matrix, ``(k, 1, 1)``)."""
    avg.lerp_(low, 1.0 - beta1)
    avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    direction = avg / (avg_sq.sqrt() / bias2 + eps)
    return direction, direction * coef


_compiled_batch_math = None


def compiled_batch_math():
    """:func:`_adam_batch_math` under ``torch.compile``, made on first use (``compile=True``)."""
    global _compiled_batch_math
    if _compiled_batch_math is None:
        _compiled_batch_math = torch.compile(_adam_batch_math, dynamic=None)
    return _compiled_batch_math


def _classes(indices, key) -> dict:
    """``indices`` grouped by ``key(i)``, each class in their order (first-seen classes first)."""
    classes: dict = {}
    for i in indices:
        classes.setdefault(key(i), []).append(i)
    return classes


@dataclass(eq=False)
class _Batch:
    """Matrices stepped together by :meth:`ProjectedAdam._step_batched` (same local shape, side, rank,
    device, basis dtype, replica group and recovery term), with what their step reads of each."""

    params: list[torch.Tensor]
    weights: list[torch.Tensor]  # the local tensors stepped in place
    states: list[dict]
    views: list[MatrixShardView]
    plans: list[subspace.SubspacePlan]
    packing: batching.PackedState = field(init=False)
    plain: bool = field(init=False)  # no DTensor among the parameters: a gradient is its local tensor

    def __post_init__(self):
        self.packing = batching.PackedState(self.states)
        self.plain = not any(map(is_dtensor, self.params))
        self._due_gap: int | None = None
        self._due_by_residue: dict[int, list[int]] = {}
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._packed: tuple[list[int], torch.Tensor | None] | None = None

    def packed_weights(self) -> torch.Tensor | None:
        """The weights as one ``(k, m, n)`` tensor over their own memory where they lie back to back
        (:func:`distopt.pack_weights`), else ``None``; found again whenever a weight's address moves."""
        addresses = list(map(torch.Tensor.data_ptr, self.weights))
        if self._packed is None or self._packed[0] != addresses:
            self._packed = (addresses, batching.packed_view(self.weights))
        return self._packed[1]

    def transposed(self, basis: torch.Tensor) -> torch.Tensor:
        """``basis.transpose(-2, -1)``, made once while ``basis`` is the batch's packed basis buffer
        (an fp32 copy of bf16 bases is new on every step and not kept)."""
        held = self._transposed
        if held is not None and held[0] is basis:
            return held[1]
        view = basis.transpose(-2, -1)
        if basis is self.packing.get("basis")[0]:
            self._transposed = (basis, view)
        return view

    def grads(self) -> list[torch.Tensor]:
        return list(map(_grad_of, self.params)) if self.plain else [local(p.grad) for p in self.params]

    def due(self, steps: list[int], group: dict) -> Sequence[int]:
        """The members whose refresh is due at their step counts ``steps``: when the counts agree (the
        usual case), looked up by the step's residue modulo the gap instead of tested one by one."""
        first = steps[0]
        if first == 0 or min(steps) != max(steps):
            return [i for i, (step, plan) in enumerate(zip(steps, self.plans)) if subspace.refresh_due(step, plan, group)]
        gap = group["update_proj_gap"]
        if self._due_gap != gap:  # members by the residue (step mod gap) at which they refresh
            self._due_by_residue = {}
            for i, plan in enumerate(self.plans):
                if not plan.full:
                    self._due_by_residue.setdefault(refresh_residue(gap, plan.phase), []).append(i)
            self._due_gap = gap
        return self._due_by_residue.get(first % gap, ())

    def moment_counts(self, steps: list[int], group: dict) -> list[int]:
        """:func:`subspace.moment_updates` of each member at its step count: one call when the counts
        agree and no reset makes them depend on the phase."""
        if group["moment_policy"] != "reset" and min(steps) == max(steps):
            return [subspace.moment_updates(steps[0], self.plans[0], group)] * len(steps)
        return [subspace.moment_updates(step, plan, group) for step, plan in zip(steps, self.plans)]


class ProjectedAdam(SubspaceOptimizer):
    """Adam in a moving rank-``r`` subspace; subclasses decide where the basis goes.

    Per matrix, at a refresh step the new basis comes from :meth:`_new_basis`; the moments are then
    mapped per ``moment_policy`` with ``C = S_new^T S_old`` computed from the basis held just before
    the switch. Every step: ``R = proj(G)``, Adam on ``R``, ``W -= step (alpha back(N) + D_hat)``
    where ``D_hat`` is the recovery-scaled residual (only with ``recovery_scaling``). Adam's bias
    corrections count the moment updates since the last reset under ``moment_policy="reset"``,
    and since the first step otherwise. At full rank (``rank >= d``) nothing is projected and
    ``alpha`` is not applied: the step is AdamW's.

    ``projection_precision="tf32"`` runs ``proj(G)`` and ``back(N)`` on TF32 tensor cores (CUDA):
    the step 1.8x faster at LLaMA-1B, rank 512, on an H100 (``benchmarks/gpu_suite.py``: 91.3 ->
    50.8 ms), with a 10-bit mantissa in those products; the refresh stays fp32 either way. The
    default ``fp32`` holds the step to fp32 whatever the global TF32 flags. ``"bf16"`` rounds the
    operands of those products to bf16 (8-bit mantissa) and accumulates in fp32: bf16 GEMMs with an
    fp32 result on CUDA, the same numbers from rounded fp32 operands elsewhere; the moments, the
    basis and its refresh stay fp32. Its effect on training is measured in ``docs/convergence.md``.

    ``compile=True`` runs the batched step's element-wise Adam (both moments, the direction and its
    scaling) as one ``torch.compile`` graph (compiled on the first steps, shape-generic after a
    second batch shape) instead of torch's fused Adam kernel.

    State per matrix: ``step`` (int64), ``basis`` (``d x r``), ``exp_avg`` and ``exp_avg_sq``
    (``r x D`` or ``D x r``), and ``rs_norm`` (0-d) with recovery scaling, all fp32.

    Row-sharded (FSDP2, HSDP, ZeRO through ``distopt.deepspeed``), ``state_layout="partitioned"``
    (the default) splits every ``d``-long tensor over the shard group: a right basis by rows
    (all-gathered for each step), the left side's moments by columns (``P^T G`` reduce-scattered,
    the direction all-gathered). ``"replicated"`` keeps them whole on every rank. See ``core.subspace``.
    On a plain (non-refresh) step of FSDP2/HSDP matrices, those collectives are coalesced over
    buckets of matrices (``coalesce_bytes`` of whole bases and sums each): one all-gather of bases,
    one reduction of ``P^T G``, one all-gather of directions (with Fira's ``R`` and ratio) and one
    all-reduce of Fira's norms per bucket.

    Matrices of one local shape, side and rank are stepped as a batch: one ``bmm`` for their
    projections, one for their updates, and Adam's element-wise math on their moments at once, which
    one process keeps packed in one buffer per state tensor (``core.batching``; each state dict holds
    its slice). That math is one pass of torch's fused Adam kernel, which steps a zeroed buffer as
    its "parameter" and so writes ``-step alpha N``; with Fira's recovery term, which needs ``N``
    itself, it is eight eager ops. The ``hf`` form, bf16 weights, full rank and the engine adapters'
    matrices are stepped one by one.
    """

    matrix_roles = LINEAR_ROLES
    shape_hparams = ("rank", "side", "recovery_scaling")

    # -- validation ----------------------------------------------------------------------------
    def _check_matrix_hparams(self, group: dict) -> None:
        subspace.check_subspace_hparams(group)
        check_option(group, "scale", low=0, low_open=True, note="GaLore's alpha, e.g. 0.25")
        check_option(group, "projection_precision", "choice", choices=PROJECTION_PRECISIONS)
        if "compile" in group:
            check_option(group, "compile", "bool")
        if "basis_dtype" in group:
            check_option(group, "basis_dtype", "choice", choices=tuple(subspace.BASIS_DTYPES))
        check_recovery_hparams(group)
        self._check_algorithm_hparams(group)

    def _check_algorithm_hparams(self, group: dict) -> None:
        """Validate the hyper-parameters specific to one algorithm."""

    def projected_sync_refusal(self, group: dict) -> str | None:
        """Adam on ``proj(G)`` and refreshes from sketches (or a whole averaged ``G`` for ``svd``, or
        no ``G`` at all) use ``G`` linearly only; Fira's residual ``G - back(proj(G))`` does not."""
        if group["recovery_scaling"]:
            return f"{self.algorithm} with recovery_scaling adds the residual G - back(proj(G)), which needs the full averaged G"
        return None

    # -- basis ---------------------------------------------------------------------------------
    def _new_basis(self, grad, state, group, view: MatrixShardView, plan, step: int, index: int) -> torch.Tensor:
        """The basis to use from this refresh on (``step == 0``: the first one). Must not modify state."""
        raise NotImplementedError

    def _data_method(self, group: dict, step: int) -> str | None:
        """The data-driven method (``svd``, ``randomized``, ``random``) ``_new_basis`` uses at refresh step
        ``step``, or ``None`` where it moves the basis another way."""
        return group["refresh"]

    def full_gradient_due(self, p: torch.Tensor) -> bool:
        view = self._views[p]
        if view.replicas is None:
            return False
        group = self._group_of(p)
        plan = subspace.plan(view, group)
        state = self.state.get(p)
        step = int(state["step"]) if state else 0
        return subspace.refresh_due(step, plan, group) and self._data_method(group, step) == "svd"

    def _refresh_request(self, group: dict, state: dict, view: MatrixShardView, grad: torch.Tensor):
        plan = subspace.plan(view, group)
        step = self._step_count(view, state)
        if plan.full or not subspace.refresh_due(step, plan, group):
            return None
        index = refresh_index(step, group["update_proj_gap"], plan.phase)
        method = self._data_method(group, step)
        return self._data_request(method, grad, self._whole_previous(method, state, view, plan, step), group, view,
                                  plan, step, index)

    @staticmethod
    def _whole_previous(method: str | None, state: dict, view: MatrixShardView, plan, step: int) -> dict:
        """``state`` with the whole basis where a warm-started refresh request needs it (a chunked
        right basis is gathered ahead of the step, which gathers it again: refresh steps only)."""
        if method == "randomized" and step > 0:  # the whole fp32 basis: the stored one where it is that
            return {**state, "basis": subspace.gathered_basis(state, view, plan).float()}
        return state

    @staticmethod
    def _data_request(method: str | None, grad, state, group, view: MatrixShardView, plan, step: int, index: int):
        """Inputs of a gradient-driven basis (``svd``, ``randomized``); ``None`` for other methods. The
        gradient is kept as it is (bf16 included): the refresh converts it where it uses it, so no
        fp32 copy of a refreshing gradient lives through the step."""
        if method == "svd":
            return SvdRequest(grad, view, plan.side, plan.rank)
        if method == "randomized":
            return RangeRequest(
                grad, view, plan.side, plan.rank, group["oversample"], group["power_iters"],
                stable_seed(group["seed"], view.name, index, "range"), state["basis"] if step > 0 else None,
            )
        return None

    @staticmethod
    def _data_basis(method: str, grad, state, group, view: MatrixShardView, plan, step: int, index: int) -> torch.Tensor:
        """A basis found from the gradient (``svd``, ``randomized``) or a seeded Haar one (``random``)."""
        if method == "random":
            return ProjectedAdam._haar(group, view, plan, index, grad.device)
        return compute_basis(ProjectedAdam._data_request(method, grad, state, group, view, plan, step, index))

    @staticmethod
    def _haar(group, view: MatrixShardView, plan, index: int, device) -> torch.Tensor:
        """A Haar-random basis drawn from the refresh index alone: identical on every rank."""
        return random_basis(view, plan.side, plan.rank, stable_seed(group["seed"], view.name, index, "haar"), device)

    @staticmethod
    def basis_layout(view: MatrixShardView, plan) -> tuple[object, tuple[int, ...]]:
        """``(group, row_counts)`` of the basis: row-sharded like ``G`` for a left basis, else replicated."""
        if plan.side == "left":
            return view.group, view.row_counts
        return None, (view.n,)

    # -- state and step --------------------------------------------------------------------------
    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        subspace.allocate_basis(state, view, plan, p.device, subspace.basis_dtype(group))
        shape = subspace.projected_shape(view, plan)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if group["recovery_scaling"] and not plan.full:
            state["rs_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _switch(self, new: torch.Tensor, state: dict, group: dict, view: MatrixShardView, plan) -> None:
        """Install ``new`` as the basis, mapping the moments from the basis held until now."""
        policy = group["moment_policy"]
        if policy != "keep":
            old = state["basis"]
            c = change_of_basis(new, old, plan.side, view.group) if policy != "reset" else None
            # c is None for "reset" only.
            unseen = unseen_fraction(new, old, cast(torch.Tensor, c), plan.side, view.group) if policy == "transform" else None
            apply_moment_policy(policy, plan.side, c, state["exp_avg"], state["exp_avg_sq"],
                                step=int(state["step"]), betas=group["betas"], unseen=unseen)
        state["basis"].copy_(new)

    def _chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        view = self._views[p]
        return subspace.distributed_state(view, subspace.plan(view, group), ("exp_avg", "exp_avg_sq"))

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        with subspace.whole_basis(state, view, plan) as work:
            self._step_with_basis(p, grad, work, group, view, plan)

    def _refresh_if_due(self, grad, state: dict, group: dict, view: MatrixShardView, plan) -> None:
        """Install this step's new basis when a refresh is due (``grad`` as the step received it: the
        refresh prepared for this step matches it by identity)."""
        step = int(state["step"])
        if view.name in self._prepared_lows:  # refreshed already, by clip_grad_norm_
            return
        if subspace.refresh_due(step, plan, group):
            index = refresh_index(step, group["update_proj_gap"], plan.phase)
            new = self._new_basis(grad, state, group, view, plan, step, index)
            if step == 0:
                state["basis"].copy_(new)
            else:
                self._switch(new, state, group, view, plan)

    def _step_with_basis(self, p, grad, state: dict, group: dict, view: MatrixShardView, plan) -> None:
        step = int(state["step"])
        self._refresh_if_due(grad, state, group, view, plan)
        grad = grad.float()
        with projection_matmuls(group):  # Adam's element-wise math in between has no matmul
            low = self._projected(grad, state, view, plan)
            direction, step_size = self._adam_in_subspace(low, state, group, plan, step)
            update = subspace.back_project(direction, state, view, plan)
            residual = None
            if "rs_norm" in state:
                residual = recovery_term(
                    grad, low, direction, state["basis"], plan.side, view, state["rs_norm"], group["norm_growth_limit"],
                    columns_chunked=plan.columns_chunked,
                )
        self._apply(p, update, step_size, group, plan, residual)

    def _projected(self, grad, state: dict, view: MatrixShardView, plan) -> torch.Tensor:
        """``proj(G)`` for this step: the one :meth:`prepare_projections` left, else computed now."""
        prepared = self._prepared_lows.pop(view.name, None)
        return prepared if prepared is not None else subspace.project_grad(grad, state, view, plan)

    def _whole_on_every_shard(self, p: torch.Tensor) -> bool:
        plan = subspace.plan(self._views[p], self._group_of(p))
        return plan.side == "left" and not plan.full and not plan.columns_chunked

    def prepare_projections(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Take this step's refresh (when due) and ``proj(G)`` of ``params`` now, averaged over the
        replicas when they sync by projection, and keep them for :meth:`step`, which then neither
        refreshes nor projects those matrices again. Returns each projection by parameter: what a
        norm of the synced gradient is made from (:meth:`SubspaceOptimizer.clip_grad_norm_`)."""
        self.allocate_state()
        self._prepared_lows.clear()  # a call not followed by step() leaves nothing stale behind
        wanted = {id(p) for p in params}
        out = {}
        for group in self.param_groups:
            if group["kind"] != "matrix":
                continue
            taken = [q for q in group["params"] if id(q) in wanted]
            with prepared_bases(self._batched_refresh_requests(group, taken)):  # refreshes side by side, as in step()
                for p in taken:
                    view, state = self._views[p], self.state[p]
                    plan = subspace.plan(view, group)
                    grad = local(p.grad)
                    with subspace.whole_basis(state, view, plan) as work:
                        self._refresh_if_due(grad, work, group, view, plan)
                        with projection_matmuls(group):
                            low = subspace.project_grad(grad.float(), work, view, plan)
                    self._prepared_lows[view.name] = out[p] = low
        return out

    @staticmethod
    def _adam_in_subspace(low, state: dict, group: dict, plan, step: int):
        """Adam's moments of the projected gradient ``low`` and its direction and step size."""
        beta1, beta2 = group["betas"]
        update_moments(state["exp_avg"], state["exp_avg_sq"], low, beta1, beta2, group["adam_form"])
        state["step"] += 1
        count = subspace.moment_updates(step, plan, group)
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], count, beta1, beta2, group["eps"], float(group["lr"]),
                              group["adam_form"])

    @staticmethod
    def _apply(p, update, step_size, group: dict, plan, residual=None) -> None:
        """``W -= step (alpha back(N) + D_hat)`` from the back-projected ``update`` and Fira's ``D_hat``."""
        if group["scale"] != 1 and not plan.full:  # nothing is projected away at full rank: AdamW's step
            update = update * group["scale"]
        if residual is not None:
            update = update + residual
        apply_update(p, update, step_size, float(group["lr"]), group["weight_decay"], group["adam_form"])

    # -- steps of matrices that need no collective, batched --------------------------------------
    def _batchable(self, p: torch.Tensor, group: dict) -> bool:
        """A projected fp32 matrix whose step needs no collective: one process, or a shard group of
        one. The ``hf`` form (kept op for op as galore-torch) and low-precision weights take the
        per-matrix path."""
        view = self._views[p]
        if group["adam_form"] != "torch" or p.dtype != torch.float32:
            return False
        if view.sharded and comm.world_size(view.group) > 1:
            return False
        return not subspace.plan(view, group).full

    def _scaled_adam_list(self, lows: list[torch.Tensor], states: list[dict], plans: list, group: dict,
                          steps: list[int]) -> list[torch.Tensor] | None:
        """:meth:`_adam_batched` in torch's fused Adam kernel, giving the scaled directions
        ``-step alpha N`` themselves, written over ``lows`` where the kernel allows
        (:func:`batching.adam_directions_in_place`); ``None`` (nothing changed) where it does not run."""
        beta1, beta2 = group["betas"]
        counts = self._count_tensors([subspace.moment_updates(step, plan, group) for step, plan in zip(steps, plans)],
                                     lows[0])
        avgs, avg_sqs = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
        step = float(group["lr"]) * group["scale"]
        if batching.adam_directions_in_place(avgs, avg_sqs, lows, counts, beta1, beta2, group["eps"]):
            torch._foreach_mul_(lows, step)  # N over R, then scaled: no second buffer of R's size
            outs = lows
        else:
            outs = list(torch._foreach_mul(lows, 0.0))  # zeroed buffers shaped like R, in one op (finite R)
            if not batching.scaled_adam_directions(avgs, avg_sqs, lows, outs, counts, step, beta1, beta2, group["eps"],
                                                   zeroed=True):
                return None
        return outs

    @staticmethod
    def _adam_batched(lows: list, states: list[dict], plans: list, group: dict,
                      steps: list[int]) -> tuple[Sequence[torch.Tensor], list[float]]:
        """:meth:`_adam_in_subspace` over a list (the ``torch`` form), as ``torch._foreach_*`` calls:
        the moments of ``lows`` (``steps``: their step counts now; the caller advances the counters),
        the directions and step sizes ``lr / c_1``."""
        beta1, beta2 = group["betas"]
        counts = [subspace.moment_updates(step, plan, group) for step, plan in zip(steps, plans)]
        avgs = [state["exp_avg"] for state in states]
        avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_lerp_(avgs, lows, 1.0 - beta1)
        torch._foreach_mul_(avg_sqs, beta2)
        torch._foreach_addcmul_(avg_sqs, lows, lows, value=1.0 - beta2)
        denominators = torch._foreach_sqrt(avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2**count) for count in counts])
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(avgs, denominators)
        return directions, [float(group["lr"]) / (1.0 - beta1**count) for count in counts]

    def _batches(self, group: dict, params: list[torch.Tensor]) -> list[_Batch]:
        """``params`` split into batches of matrices that share a local shape, side, rank, device,
        basis dtype, replica group and recovery term; cached for the same parameters, views and
        settings, so a plain step's Python work per matrix is a few integer tests."""
        key = (id(group), tuple(map(id, params)), self._views_version, group["rank"], group["side"],
               group["update_proj_gap"], group["stagger"], group.get("state_layout"), group.get("basis_dtype"),
               group["recovery_scaling"], group["moment_policy"])
        cache = self.__dict__.setdefault("_batch_cache", {})
        hit = cache.get(key)
        if hit is not None:
            return hit
        members: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            w, state, view = local(p), self.state[p], self._views[p]
            plan = subspace.plan(view, group)
            members.setdefault((tuple(w.shape), plan.side, plan.rank, w.device, state["basis"].dtype, id(view.replicas),
                                "rs_norm" in state), []).append(p)
        batches = [_Batch(ps, [local(p) for p in ps], [self.state[p] for p in ps], [self._views[p] for p in ps],
                          [subspace.plan(self._views[p], group) for p in ps]) for ps in members.values()]
        if len(cache) >= 1024:  # every chunk of every group (a 7B model has dozens), and a few more:
            cache.clear()  # a skipped matrix changes a chunk for one step
        cache[key] = batches
        return batches

    def _step_batched(self, group: dict, params: list[torch.Tensor]) -> list[_Batch]:
        """One step of ``params``, with the matrices that share a local shape, side, rank and dtypes
        stepped as one batch.

        Per matrix, only its refresh when one is due (then it joins its batch). Per batch, a fixed
        number of kernels: the gradients stacked, ``R = proj(G)`` as one ``bmm``, Adam's moments and
        direction on the batch's packed state in one fused kernel, the direction written over ``R``
        (``core.batching``: each state tensor of the batch is one buffer, each matrix's state a slice
        of it), ``step back(N)`` as one ``baddbmm`` into the stacked gradients' buffer, and the weight
        decay and the update of all the batch's weights as one more; where the weights lie back to
        back in one buffer (:func:`distopt.pack_weights`), ``back(N)`` and the decay go into them as
        one ``baddbmm``, with no update buffer and no second pass. The
        replicas' averages of every batch's projections (projected sync) take one collective per
        replica group. Fira's recovery term is batched too, made over the stacked gradients (no other
        full-size temporary): the residual and the update are one ``baddbmm`` each. The numbers are
        the per-matrix path's up to the rounding of the batched products. Returns the batches, whose
        step counters the caller advances (one call for every chunk's)."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        batches = self._batches(group, params)
        fresh: dict[int, torch.Tensor] = {}  # this step's new bases in fp32 where they are stored in bf16
        if all(batch.views[0].replicas is None for batch in batches):  # each batch from its check to its update
            stepped = []
            for batch in batches:
                finite, grads = self._check_batch(group, batch)
                if not finite:
                    continue
                counts = self._refresh_due(group, batch, fresh)
                basis, low, _, grads = self._batch_projection(group, batch, fresh, reuse=True, grads=grads)
                self._adam_update_batch(group, batch, counts, basis, low, lr, wd, eps, beta1, beta2, grads)
                stepped.append(batch)
            return stepped
        batches = [batch for batch in batches if self._check_batch(group, batch)[0]]
        counts_of = [self._refresh_due(group, batch, fresh) for batch in batches]
        projected = [self._batch_projection(group, batch, fresh, reuse=False) for batch in batches]
        # Projected sync: the replicas' averages of what is not averaged yet, one collective per group.
        waiting: dict[int, tuple[object, list[int]]] = {}
        for i, batch in enumerate(batches):
            if batch.views[0].replicas is not None and projected[i][2]:
                waiting.setdefault(id(batch.views[0].replicas), (batch.views[0].replicas, []))[1].append(i)
        for group_, indices in waiting.values():
            averaged = comm.replica_mean_coalesced([projected[i][1] for i in indices], group_)
            for i, low in zip(indices, averaged):
                projected[i] = (projected[i][0], low, False, None)
        for batch, counts, (basis, low, _, _) in zip(batches, counts_of, projected):
            self._adam_update_batch(group, batch, counts, basis, low, lr, wd, eps, beta1, beta2)
        return batches

    def _refresh_due(self, group: dict, batch: _Batch, fresh: dict) -> list[int]:
        """The refreshes due in a batch this step (each member's new fp32 basis in ``fresh`` where it is
        stored in bf16), and the members' moment counts."""
        steps = batch.packing.get("step")[0].tolist()  # one host read per batch
        for i in batch.due(steps, group):
            p, state, view, plan = batch.params[i], batch.states[i], batch.views[i], batch.plans[i]
            with subspace.whole_basis(state, view, plan) as work:  # fp32: a bf16 basis converted, stored back
                self._refresh_if_due(local(p.grad), work, group, view, plan)
            if work["basis"] is not state["basis"]:  # used unrounded this step, as the per-matrix step does
                fresh[id(p)] = work["basis"]
        return batch.moment_counts(steps, group)

    def _stacked_grads(self, batch: _Batch) -> torch.Tensor:
        """A batch's gradients stacked in the ``stacked`` scratch slot."""
        grads = batch.grads()
        return torch.stack(grads, out=self._scratch("stacked", (len(grads), *grads[0].shape), grads[0]))

    def _check_batch(self, group: dict, batch: _Batch) -> tuple[bool, torch.Tensor | None]:
        """Where step() left a batch's members to it (:meth:`_checked_in_step`), their gradients
        stacked and checked for NaN and Inf in one pass: ``(True, stacked)`` when all are finite. Else
        the finite ones step one by one, each other is skipped and counted, and ``(False, None)``.
        ``(True, None)`` for a batch step() checked."""
        if self._checking_in_step.isdisjoint(map(id, batch.params)):
            return True, None
        grads = self._stacked_grads(batch)
        # A NaN or Inf makes the sum NaN or Inf; finite gradients overflow it only past 1e38, and then
        # the exact test below steps them all one by one. One read, one host read per batch (CPU only).
        if math.isfinite(grads.sum().item()):
            return True, grads
        for p, bad in zip(batch.params, (~torch.isfinite(grads)).flatten(1).any(1).tolist()):
            if bad:
                self.record_nonfinite_skip(self._names[p])
            else:
                self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
        return False, None

    def _checked_in_step(self, groups: list[dict]) -> frozenset[int]:
        # The CPU batches with no replicas to agree with: each checks its stacked gradients, a copy in
        # cache, where step()'s check would read every gradient once more from memory.
        self.__dict__.pop("_routes_now", None)  # a new step
        ids: set[int] = set()
        for group in groups:
            if group["kind"] == "matrix":
                ids.update(self._routes(group, group["params"])[4])
        self._checking_in_step = frozenset(ids)
        return self._checking_in_step

    def _adam_update_batch(self, group: dict, batch: _Batch, counts: list[int], basis, low, lr, wd, eps, beta1, beta2,
                           grads: torch.Tensor | None = None):
        """Adam on a batch's packed moments from its projections ``low``, then ``W -= step (alpha back(N) +
        D_hat)`` (``D_hat``: Fira's term); the moments stored back where the batch's are copies."""
        packing = batch.packing
        avg, avg_copied = packing.get("exp_avg")
        avg_sq, avg_sq_copied = packing.get("exp_avg_sq")
        corrections = {c: (math.sqrt(1.0 - beta2**c), lr / (1.0 - beta1**c)) for c in set(counts)}  # usually one
        if len(corrections) == 1:  # the usual case: no Python pass per matrix
            (bias2_, size_), = corrections.values()
            bias2, sizes = [bias2_] * len(counts), [size_] * len(counts)
        else:
            bias2 = [corrections[c][0] for c in counts]
            sizes = [corrections[c][1] for c in counts]
        recovery = "rs_norm" in batch.states[0]  # a batch shares its recovery term (see _batches)
        if not recovery and not group.get("compile"):
            self._plain_update_batch(group, batch, avg, avg_sq, counts, bias2, basis, low, lr, wd, eps, beta1, beta2,
                                     grads)
        else:
            self._scaled_update_batch(group, batch, avg, avg_sq, counts, bias2, sizes, basis, low, lr, wd, eps, beta1,
                                      beta2, grads, recovery)
        for key, value, copied in (("exp_avg", avg, avg_copied), ("exp_avg_sq", avg_sq, avg_sq_copied)):
            if copied:
                packing.store_back(key, value)

    def _plain_update_batch(self, group: dict, batch: _Batch, avg, avg_sq, counts: list[int], bias2: list[float], basis,
                            low, lr, wd, eps, beta1, beta2, grads: torch.Tensor | None) -> None:
        """Adam on a batch's packed moments, with its direction ``N`` written over ``low`` (``R`` is
        not needed after the moments: no second buffer of its size; ``N`` carries the minus sign), then
        ``W <- (1 - lr wd) W + lr alpha back(N)``, the step ``lr alpha`` applied as the back-projection's
        factor. ``back(N)`` goes into the weights where they are packed, else into the stacked
        gradients' buffer (dead since the projection), so one full-size temporary is alive at a time."""
        split = _by_count(counts)
        if not batching.adam_directions_in_place(split(avg), split(avg_sq), split(low), self._count_tensors(counts, low),
                                                 beta1, beta2, eps):
            avg.lerp_(low, 1.0 - beta1)
            avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            direction = torch.sqrt(avg_sq, out=low)
            direction.div_(batching.per_matrix(bias2, low, 3)).add_(eps)
            torch.div(avg, direction, out=direction)
            direction.mul_(batching.per_matrix([-1.0 / (1.0 - beta1**c) for c in counts], low, 3))
        self._back_into_weights(group, batch, low, basis, lr * group["scale"], lr * wd, grads)

    def _back_into_weights(self, group: dict, batch: _Batch, direction, basis, alpha: float, decay: float,
                           grads: torch.Tensor | None) -> None:
        """``W <- (1 - decay) W + alpha back(direction)`` for a batch: into the weights as one
        ``baddbmm`` where they are packed; else ``alpha back(direction)`` into the stacked gradients'
        buffer (dead since the projection; the kept one on CPU), so one full-size temporary is alive
        at a time, then one update kernel."""
        side, basis_t = batch.plans[0].side, batch.transposed(basis)
        shape = (len(batch.weights), *batch.weights[0].shape)
        with projection_matmuls(group):
            packed = batch.packed_weights()
            if packed is not None and packed.dtype == direction.dtype:
                add_back(packed, direction, basis, side, alpha=alpha, basis_t=basis_t, beta=1.0 - decay)
                torch.autograd.graph.increment_version(batch.weights)  # as an in-place op on each would
                return
            out, rows = self._scratch_rows("stacked", shape, direction)
            if out is None and grads is not None and grads.shape == shape:
                out = grads
            update = scaled_back(direction, basis, side, alpha, out=out, basis_t=basis_t)
            if update is not out or not rows:
                rows = update.unbind(0)
        batching.add_updates(batch.weights, rows, decay)

    def _scaled_update_batch(self, group: dict, batch: _Batch, avg, avg_sq, counts: list[int], bias2: list[float],
                             sizes: list[float], basis, low, lr, wd, eps, beta1, beta2, grads: torch.Tensor | None,
                             recovery: bool) -> None:
        """Adam on a batch's packed moments, its scaled direction in a buffer of its own (Fira's term
        needs ``R`` and the direction; the compiled math gives both), then ``W -= step (alpha back(N) +
        D_hat)`` (``D_hat``: Fira's term, made in the buffer of the stacked gradients ``grads`` when
        given, else of a new stack; without it, :meth:`_back_into_weights`)."""
        coefs = [-size * group["scale"] for size in sizes]
        if group.get("compile"):  # per-matrix factors as tensors, so a new step count does not recompile
            direction, scaled = compiled_batch_math()(
                avg, avg_sq, low, beta1, beta2, eps, batching.per_matrix(bias2, low, 3, as_tensor=True),
                batching.per_matrix(coefs, low, 3, as_tensor=True))
            if not recovery:
                self._back_into_weights(group, batch, scaled, basis, 1.0, lr * wd, grads)
                return
        else:  # Fira's term (the plain path takes the rest)
            scaled = None
            # One fused pass. Fira's residual also needs the unscaled direction: the scaled one divided
            # by its factor, unless a factor is 0 (a warmup from lr 0), which only the eager ops survive.
            if all(coefs):
                out = self._scratch("scaled", low.shape, low)
                zeroed = out is None
                out = torch.zeros_like(low, memory_format=torch.contiguous_format) if out is None else out
                split = _by_count(counts)
                if batching.scaled_adam_directions(split(avg), split(avg_sq), split(low), split(out),
                                                   self._count_tensors(counts, low), lr * group["scale"], beta1, beta2,
                                                   eps, zeroed=zeroed):
                    scaled = out
                    direction = torch.div(scaled, batching.per_matrix(coefs, low, 3),
                                          out=self._scratch("direction", low.shape, low))
            if scaled is None:
                avg.lerp_(low, 1.0 - beta1)
                avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
                direction = torch.sqrt(avg_sq, out=self._scratch("direction", avg_sq.shape, avg_sq))
                # One bias correction for the whole batch unless staggered resets made the counts differ.
                direction.div_(batching.per_matrix(bias2, low, 3)).add_(eps)
                torch.div(avg, direction, out=direction)
                scaled = torch.mul(direction, batching.per_matrix(coefs, low, 3),
                                   out=self._scratch("scaled", direction.shape, direction))
        side = batch.plans[0].side
        shape = (len(batch.weights), *batch.weights[0].shape)
        rows: Sequence[torch.Tensor]
        with projection_matmuls(group):  # in the stacked gradients' buffer: no other full-size temporary
            if grads is None:
                grads = self._stacked_grads(batch)
            update = self._recovery_batch(group, batch, grads, basis, low, direction, sizes)
            add_back(update, scaled, basis, side, basis_t=batch.transposed(basis))
            packed = batch.packed_weights()
            if packed is not None and packed.dtype == update.dtype:  # one tensor for the whole batch
                batching.add_updates([packed], [update], lr * wd)
                torch.autograd.graph.increment_version(batch.weights)
                return
            if update.device.type in CACHED_SCRATCH_DEVICES and update is self._scratch("stacked", shape, update):
                rows = self._scratch_rows("stacked", shape, update)[1]  # the kept buffer's rows, made once
            else:
                rows = update.unbind(0)
        del scaled
        batching.add_updates(batch.weights, rows, lr * wd)

    @staticmethod
    def _advance_steps(batches: list[_Batch]) -> None:
        """Every batch's step counters ``+1``, in one multi-tensor call."""
        packed = [batch.packing.get("step") for batch in batches]
        torch._foreach_add_([steps for steps, _ in packed], 1)
        for batch, (steps, copied) in zip(batches, packed):
            if copied:
                batch.packing.store_back("step", steps)

    def _recovery_batch(self, group: dict, batch: _Batch, grads: torch.Tensor, basis: torch.Tensor, low: torch.Tensor,
                        direction: torch.Tensor, sizes: list[float]) -> torch.Tensor:
        """Fira's term of every matrix of a batch, ``-step D_hat`` (:mod:`core.recovery`, batched),
        written over the stacked gradients ``grads``; each ``rs_norm`` updated. The per-matrix rule's
        numbers, with one kernel per stage for the batch."""
        side = batch.plans[0].side
        residual = scaled_residual_(grads, low, channel_ratio(low, direction, side, batch_dims=1), basis, side,
                                    basis_t=batch.transposed(basis))
        last, copied = batch.packing.get("rs_norm")
        limited_batch_(residual, torch.linalg.vector_norm(residual, dim=(1, 2)), last, group["norm_growth_limit"],
                       [-size for size in sizes])
        if copied:
            batch.packing.store_back("rs_norm", last)
        return residual

    def _count_tensors(self, counts: list[int], like: torch.Tensor) -> list[torch.Tensor]:
        """A batch's moment counts as float tensors on ``like``'s device for the fused Adam kernel: when
        they agree (the usual case), one kept tensor, refilled only when the count changes (once a
        step, not once a batch: the kernel only reads it), else one per matrix."""
        if min(counts) == max(counts):
            kept = self.__dict__.setdefault("_count_scalars", {})
            held = kept.get(like.device)
            if held is None:
                held = kept[like.device] = [torch.zeros((), dtype=torch.float32, device=like.device), None]
            if held[1] != counts[0]:
                held[0].fill_(counts[0])
                held[1] = counts[0]
            return [held[0]]
        return list(torch.tensor(counts, dtype=torch.float32).to(like.device).unbind(0))

    def _scratch(self, slot: str | None, shape, like: torch.Tensor) -> torch.Tensor | None:
        """The ``out=`` of an fp32 ``shape`` result of a batch's temporaries (``slot``: ``stacked``
        gradients, then updates; ``low``, ``direction``, ``scaled``), overwritten by the next batch. On
        CPU it is a view of a buffer per slot kept between steps (as large as the largest batch's): a
        fresh multi-megabyte host allocation is mapped from the OS and page-faulted on every step, which
        cost as much as the products. Elsewhere (and with no slot) ``None``, so that the op allocates its
        result (the caching allocator does the reuse) with no allocation op of its own; a new fp32 tensor
        where ``like`` is not fp32, so that the op converts as it writes."""
        if slot is None or like.device.type not in CACHED_SCRATCH_DEVICES:
            if like.dtype == torch.float32:
                return None
            return torch.empty(shape, dtype=torch.float32, device=like.device)
        shape = tuple(shape)
        views = self.__dict__.setdefault("_cpu_scratch_views", {})
        view = views.get((slot, shape))
        if view is not None and view.shape == shape:  # an out= resize would have changed it
            return view
        numel = math.prod(shape)
        buffers = self.__dict__.setdefault("_cpu_scratch", {})
        buffer = buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[slot] = torch.empty(numel, dtype=torch.float32)
            for key in [key for key in views if key[0] == slot]:  # views (and rows) of the buffer it replaces
                del views[key]
        view = views[(slot, shape)] = buffer[:numel].view(shape)
        return view

    def _scratch_rows(self, slot: str, shape, like: torch.Tensor) -> tuple[torch.Tensor | None, Sequence[torch.Tensor]]:
        """:meth:`_scratch` and its views ``[i]``, made once per shape for a CPU buffer kept between steps
        (making 224 views took as long as adding them into the weights); ``(None, ())`` where the op
        is to allocate."""
        out = self._scratch(slot, shape, like)
        if out is None:
            return None, ()
        if like.device.type not in CACHED_SCRATCH_DEVICES:
            return out, out.unbind(0)
        views = self.__dict__["_cpu_scratch_views"]
        held = views.get((slot, tuple(shape), "rows"))
        if held is None or held[0] is not out:  # rows of the view _scratch keeps, while it keeps it
            held = views[(slot, tuple(shape), "rows")] = (out, out.unbind(0))
        return out, held[1]

    def _batch_projection(self, group: dict, batch: _Batch, fresh: dict, reuse: bool, grads: torch.Tensor | None = None):
        """``(basis, R, to_average, G)`` of a batch: its bases in fp32 (the packed buffer itself when it
        is fp32; ``fresh`` ones unrounded) and ``proj(G)`` of every matrix, ``(k, r, n)`` or ``(k, m, r)``
        (in the ``low`` scratch slot with ``reuse``, so only until the next batch's); ``to_average``
        when the replicas' average of ``R`` is still to take (``clip_grad_norm_`` takes it with the
        projections it prepares); with ``reuse``, the stacked gradients (else ``None``: not kept),
        ``grads`` where the caller stacked them already."""
        bases, _ = batch.packing.get("basis")  # read only: a refresh wrote into the slices already
        basis = bases.float()
        if fresh:
            for i, p in enumerate(batch.params):
                if id(p) in fresh:
                    basis[i].copy_(fresh[id(p)])
        side = batch.plans[0].side
        prepared = [self._prepared_lows.pop(view.name, None) for view in batch.views] if self._prepared_lows else []
        if prepared and all(low is not None for low in prepared):
            return basis, torch.stack(cast(list, prepared)), False, None
        with projection_matmuls(group):
            if not any(low is not None for low in prepared):
                if grads is None:
                    grads = self._stacked_grads(batch)
                k, m, n = grads.shape
                out = self._scratch("low" if reuse else None, (k, m, basis.shape[2]) if side == "right"
                                    else (k, basis.shape[2], n), grads)
                low = project_local(grads, basis, side, out=out, basis_t=batch.transposed(basis))
                return basis, low, True, grads if reuse else None
            # Some prepared, some not (clip_grad_norm_ given a subset): the others projected one by one.
            lows = [low if low is not None else
                    subspace.project_grad(local(p.grad).float(), {"basis": basis[i]}, batch.views[i], batch.plans[i])
                    for i, (p, low) in enumerate(zip(batch.params, prepared))]
            return basis, torch.stack(lows), False, None

    # -- plain steps of several matrices, with their collectives coalesced ---------------------------
    # Bytes of temporaries a batch holds (one process: its stacked gradients, then updates, and its
    # projections), and a bucket of coalesced collectives holds (sharded: gathered bases, r x n sums
    # and directions, projections; :meth:`_bucket_bytes`), besides one run of stacked gradients or
    # updates of at most as many bytes: a sharded plain step holds under twice this. Fewer batches and
    # buckets mean fewer ops and collectives. About what FSDP2 holds gathered for two LLaMA-7B layers
    # in bf16 during forward and backward, which is free during the optimizer step. Set it on the
    # optimizer (``optimizer.coalesce_bytes = ...``) to trade.
    coalesce_bytes = 768 << 20

    def _coalescible(self, p: torch.Tensor, group: dict) -> bool:
        """A plain step of a sharded, projected matrix with collectives to coalesce: its basis gather
        (right, chunked), its ``P^T G`` reduction and direction gather (left), Fira's norm."""
        view, state = self._views[p], self.state[p]
        if not view.sharded or comm.world_size(view.group) == 1:
            return False
        plan = subspace.plan(view, group)
        return (not plan.full and not subspace.refresh_due(self._step_count(view, state), plan, group)
                and (plan.side == "left" or plan.basis_chunked or "rs_norm" in state))

    def _routes(self, group: dict, params: list[torch.Tensor]):
        """``(sharded, chunks, single, counters, checks_itself)``: the matrices sharded over several
        ranks (coalesced on their plain steps), the chunks of batchable ones (:meth:`_step_batched`),
        the rest (stepped one by one), the sharded ones' packed step counters, and the ``id`` of
        each batchable matrix whose batch checks its own gradients (:meth:`_checked_in_step`); cached
        for the same parameters, views, dtypes and settings, and kept for the rest of the step
        (:meth:`_batched_refresh_requests` and :meth:`_step_routes` ask for the same list)."""
        now = self.__dict__.get("_routes_now")
        if now is not None and now[0] is params and now[1] == self._views_version:
            return now[2]
        key = (id(group), tuple(map(id, params)), tuple(map(_dtype_of, params)), self._views_version,
               self.coalesce_bytes, group["adam_form"], group["rank"], group["side"], group.get("state_layout"),
               group.get("basis_dtype"), group.get("compile"), group["recovery_scaling"])
        cache = self.__dict__.setdefault("_route_cache", {})
        hit = cache.get(key)
        if hit is not None:
            self._routes_now = (params, self._views_version, hit)
            return hit
        sharded = [p for p in params if self._views[p].sharded and comm.world_size(self._views[p].group) > 1]
        taken = {id(p) for p in sharded}
        batched = [p for p in params if id(p) not in taken and self._batchable(p, group)]
        taken.update(id(p) for p in batched)

        def kind(p):  # what splits batches: chunks of one kind make the fewest, largest batches
            plan = subspace.plan(self._views[p], group)
            return tuple(local(p).shape), plan.side, plan.rank

        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in batched:  # first-seen kind first
            kinds.setdefault(kind(p), []).append(p)
        # A chunk's stacked gradients (then its updates), its R (then N, over it; with Fira's recovery
        # term or the compiled math, R, N and the scaled N), and the fp32 copies of bf16 bases are
        # alive at once: at most coalesce_bytes.
        lows = 12 if group.get("compile") or any("rs_norm" in self.state[p] for p in batched) else 4
        copies = 4 if subspace.basis_dtype(group) != torch.float32 else 0

        def size(view, plan):
            return 4 * view.local_rows * view.n + lows * plan.rank * (
                view.local_rows if plan.side == "right" else view.n) + copies * plan.rank * subspace.side_dim(
                plan.side, view.global_shape)

        # Each kind chunked on its own (a chunk that took a kind's last matrices and the next kind's
        # first would make two part-full batches), then whole chunks merged while they fit together.
        chunks: list[list[torch.Tensor]] = []
        held = 0
        for members in kinds.values():
            for chunk in self._chunks(group, members, size):
                bytes_ = sum(size(self._views[p], subspace.plan(self._views[p], group)) for p in chunk)
                if chunks and held + bytes_ <= self.coalesce_bytes:
                    chunks[-1] = chunks[-1] + chunk
                    held += bytes_
                else:
                    chunks.append(chunk)
                    held = bytes_
        if len(cache) >= 16:
            cache.clear()
        counters = batching.PackedState([self.state[p] for p in sharded]) if sharded else None
        checks_itself = frozenset(id(p) for chunk in chunks for p in chunk if local(p).device.type in SELF_CHECKING_DEVICES
                                  and self._views[p].replicas is None and not is_dtensor(p))
        cache[key] = routes = (sharded, chunks, [p for p in params if id(p) not in taken], counters, checks_itself)
        self._routes_now = (params, self._views_version, routes)
        return routes

    def _step_count(self, view: MatrixShardView, state: dict) -> int:
        """``int(state["step"])``, from this step's one read of the packed counters where there is one
        (a host value either way: the counters live on the CPU)."""
        count = self.__dict__.get("_steps_now", {}).get(view.name)
        return int(state["step"]) if count is None else count

    def _batched_refresh_requests(self, group: dict, params: list[torch.Tensor]) -> list:
        # Called first in a matrix group's step: the sharded matrices' step counts, read at once.
        sharded, _, _, counters, _ = self._routes(group, params)
        self._steps_now = {}
        if counters is not None:
            steps, _ = counters.get("step")  # packed: one (k,) buffer, read in one copy
            self._steps_now = {self._views[p].name: step for p, step in zip(sharded, steps.tolist())}
        return super()._batched_refresh_requests(group, sharded)  # only the sharded ones can request

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        try:
            self._step_routes(group, params)
        finally:
            self._steps_now = {}
            self.__dict__.pop("_routes_now", None)

    def _step_routes(self, group: dict, params: list[torch.Tensor]) -> None:
        sharded, chunks, single, _, _ = self._routes(group, params)
        coalesced = [p for p in sharded if self._coalescible(p, group)]
        chosen = {id(p) for p in coalesced}
        for p in sharded:
            if id(p) not in chosen:
                self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
        for p in single:
            self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
        stepped = [batch for chunk in chunks for batch in self._step_batched(group, chunk)]
        if stepped:  # their step counters, read before and advanced after, all in one call
            self._advance_steps(stepped)
        # The same buckets on every rank: they follow the global shapes and step counts.
        counters = []
        for bucket in self._chunks(group, coalesced, self._bucket_bytes(group, coalesced), same_group=True):
            with projection_matmuls(group):
                counters += self._step_bucket(group, bucket)
        if counters:  # the buckets' step counters, read in their buckets and advanced here, in one call
            torch._foreach_add_(counters, 1)

    def _bucket_bytes(self, group: dict, params: list[torch.Tensor]):
        """``size(view, plan)``: the bytes a matrix holds through its bucket's step, from global shapes
        (the same on every rank): its ``R`` (``N`` written over it, or beside it with Fira's term, which
        needs both) at the largest rank's share; a right side's gathered basis (at its stored width
        and in fp32); a left side's ``r x n`` partial sums, then its gathered direction (with ``R``
        and the ratio, for Fira's term). A run's stacked gradients or updates are bounded apart, by
        ``coalesce_bytes`` too."""
        fira = any("rs_norm" in self.state[p] for p in params)
        gathered = 4 + (subspace.basis_dtype(group).itemsize if subspace.basis_dtype(group) != torch.float32 else 0)

        def size(view: MatrixShardView, plan) -> int:
            lows = (8 if fira else 4) * plan.rank
            if plan.side == "right":
                return lows * max(view.row_counts) + (gathered * view.n * plan.rank if plan.basis_chunked else 0)
            cols = max(view.chunk_counts(view.n)) if plan.columns_chunked else view.n
            return lows * cols + 4 * view.n * plan.rank * (2 if fira else 1)

        return size

    def _chunks(self, group: dict, params: list[torch.Tensor], size, same_group: bool = False):
        """``params`` in consecutive runs of at most ``coalesce_bytes`` (``size(view, plan)`` each; a
        single larger one stands alone), and of one process group with ``same_group``."""
        chunk: list[torch.Tensor]
        chunk, held = [], 0
        for p in params:
            view = self._views[p]
            bytes_ = size(view, subspace.plan(view, group))
            if chunk and (held + bytes_ > self.coalesce_bytes
                          or (same_group and self._views[chunk[0]].group is not view.group)):
                yield chunk
                chunk, held = [], 0
            chunk.append(p)
            held += bytes_
        if chunk:
            yield chunk

    def _step_bucket(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Plain steps of ``params`` (one process group) with one collective per kind: the right bases
        all-gathered together, the left sides' ``P^T G`` reduced together (a reduce-scatter into
        column chunks when partitioned, else an all-reduce) and their directions gathered together.
        The same numbers as stepping them one by one. Returns the step counters the caller advances
        (those of the ``torch`` form's list path; the per-matrix form advances its own)."""
        views = [self._views[p] for p in params]
        plans = [subspace.plan(view, group) for view in views]
        states = [self.state[p] for p in params]
        # Gradients as received: each is converted to fp32 where it is used, so a bucket of bf16
        # gradients never holds their fp32 copies at once.
        grads = [local(p.grad) for p in params]
        pg = views[0].group
        right = [i for i, plan in enumerate(plans) if plan.side == "right"]
        left = [i for i, plan in enumerate(plans) if plan.side == "left"]
        bases = {i: states[i]["basis"] for i in left}
        bases.update({i: states[i]["basis"] for i in right if not plans[i].basis_chunked})
        # Ordered by global shape, the bases of one shape gather into one buffer (one class for every
        # matrix with n x r bases) in which each batch that projects with them is a run of slices (no stack).
        chunked_right = sorted((i for i in right if plans[i].basis_chunked), key=lambda i: views[i].global_shape)
        gathered = comm.all_gather_rows_coalesced(
            [(states[i]["basis"], views[i].chunk_counts(views[i].n)) for i in chunked_right], pg)
        bases.update(zip(chunked_right, gathered))
        bases = {i: basis.float() for i, basis in bases.items()}  # bf16 storage: gathered at 2 bytes, used in fp32
        # Projections taken ahead by clip_grad_norm_ (reduced and averaged already) are used as they are.
        prepared = {i: low for i, view in enumerate(views) if (low := self._prepared_lows.pop(view.name, None)) is not None}
        mine = [i for i in right if i not in prepared]
        lows = dict(zip(mine, self._project_batched([grads[i] for i in mine], [bases[i] for i in mine], "right")))
        todo = [i for i in left if i not in prepared]
        sums = self._project_batched([grads[i] for i in todo], [bases[i] for i in todo], "left")  # this rank's partial sums
        if all(plans[i].columns_chunked for i in todo):
            reduced = comm.reduce_scatter_cols_coalesced(
                [(total, views[i].chunk_counts(views[i].n)) for i, total in zip(todo, sums)], pg)
        else:  # replicated r x n sums (the layout is one per group, so all or none are chunked)
            reduced = comm.all_reduce_sum_coalesced(sums, pg)
        lows.update(zip(todo, reduced))
        del sums, reduced  # the r x n partial sums: dead once reduced
        if views[0].replicas is not None:  # projected sync: the averages, in one collective
            order = sorted(lows)
            lows.update(zip(order, comm.replica_mean_coalesced([lows[i] for i in order], views[0].replicas)))
        lows.update(prepared)
        weights = [local(p) for p in params]
        step_counts = [self._step_count(view, state) for view, state in zip(views, states)]
        # Scaled in the fused kernel where every update is back(N) alone (no Fira term, fp32 weights).
        scaled = (self._scaled_adam_list([lows[i] for i in range(len(params))], states, plans, group, step_counts)
                  if group["adam_form"] == "torch" and not any("rs_norm" in state for state in states)
                  and all(w.dtype == torch.float32 for w in weights) else None)
        counters = [state["step"] for state in states] if group["adam_form"] == "torch" else []
        if scaled is not None:
            directions, sizes = dict(enumerate(scaled)), {}
        elif group["adam_form"] == "torch":
            listed, steps = self._adam_batched([lows[i] for i in range(len(params))], states, plans, group, step_counts)
            directions, sizes = dict(enumerate(listed)), dict(enumerate(steps))
        else:
            directions, sizes = {}, {}
            for i in range(len(params)):
                directions[i], sizes[i] = self._adam_in_subspace(lows[i], states[i], group, plans[i],
                                                                 self._step_count(views[i], states[i]))
        # Fira's ratio is local along the projected side; a left side in column chunks gathers its R and
        # ratio with its direction, in the same collective. Both by classes of one shape.
        fira = [i for i in range(len(params)) if "rs_norm" in states[i]]
        ratios: dict[int, torch.Tensor] = {}
        for (_, _, side), members in _classes(fira, lambda i: (lows[i].shape, directions[i].shape, plans[i].side)).items():
            ratios.update(zip(members, channel_ratio(batching.stacked([lows[i] for i in members]),
                                                     batching.stacked([directions[i] for i in members]), side,
                                                     batch_dims=1).unbind(0)))
        gather = [i for i in left if plans[i].columns_chunked]
        packed = dict(zip(gather, [directions[i] for i in gather]))
        for _, members in _classes([i for i in gather if i in ratios], lambda i: directions[i].shape).items():
            block = torch.cat([batching.stacked([directions[i] for i in members]),
                               batching.stacked([lows[i] for i in members]),
                               batching.stacked([ratios[i] for i in members]).unsqueeze(1)], dim=1)
            packed.update(zip(members, block.unbind(0)))
        wholes = dict(zip(gather, comm.all_gather_cols_coalesced(
            [(packed[i], views[i].chunk_counts(views[i].n)) for i in gather], pg,
            tags=[views[i].global_shape for i in gather])))
        del packed  # the sent blocks (with Fira's term, copies of N, R and the ratio)
        whole_dir, whole_low, whole_ratio = dict(directions), dict(lows), dict(ratios)
        whole_dir.update((i, wholes[i]) for i in gather if i not in ratios)  # the direction alone
        for (_, r), members in _classes([i for i in gather if i in ratios], lambda i: (wholes[i].shape, plans[i].rank)).items():
            block = batching.stacked([wholes[i] for i in members])  # a gathered class: no copy
            whole_dir.update(zip(members, block[:, :r].unbind(0)))
            whole_low.update(zip(members, block[:, r : 2 * r].unbind(0)))
            whole_ratio.update(zip(members, block[:, 2 * r].unbind(0)))

        def residual_of(i):  # computed twice (for the norm, then for the update) rather than held for all
            return scaled_residual(grads[i].float(), whole_low[i], whole_ratio[i], bases[i], plans[i].side)

        def run_residual(run):  # residual_of for a run of one shape, stacked: (k, rows, n)
            side = plans[run[0]].side
            stacked = torch.stack([grads[i] for i in run],  # converted to fp32 as they are copied
                                  out=self._scratch(None, (len(run), *grads[run[0]].shape), grads[run[0]]))
            return scaled_residual_(stacked, batching.stacked([whole_low[i] for i in run]),
                                    batching.stacked([whole_ratio[i] for i in run]), batching.stacked([bases[i] for i in run]),
                                    side)

        # fp32 weights in the torch form: back(N) added by batches of one shape (the one-process step's
        # products, row for row), Fira's term with it in runs of at most coalesce_bytes of residuals.
        batched = [i for i in range(len(params)) if group["adam_form"] == "torch" and weights[i].dtype == torch.float32]
        fira_runs = [run for members in _classes([i for i in batched if i in ratios], lambda i: (
            grads[i].shape, grads[i].dtype, whole_low[i].shape, bases[i].shape, plans[i].side)).values()
            for run in self._byte_runs(members, lambda i: 4 * grads[i].numel())]
        in_runs = {i for run in fira_runs for i in run}
        singles = [i for i in fira if i not in in_runs]
        sums = comm.all_reduce_sum_coalesced(
            [torch.linalg.vector_norm(run_residual(run), dim=(1, 2)).square() for run in fira_runs]
            + [residual_of(i).square().sum() for i in singles], pg)
        decay = float(group["lr"]) * group["weight_decay"]
        plain = [i for i in batched if i not in in_runs]
        self._accumulate_batched([weights[i] for i in plain], [whole_dir[i] for i in plain], [bases[i] for i in plain],
                                 None if scaled is not None else [-sizes[i] * group["scale"] for i in plain],
                                 [plans[i].side for i in plain], decay)
        for run, total in zip(fira_runs, sums):  # W <- W - decay W - step (alpha back(N) + D_hat), by runs
            update = run_residual(run)
            last = torch.stack([states[i]["rs_norm"] for i in run])
            limited_batch_(update, total.sqrt(), last, group["norm_growth_limit"], [-sizes[i] for i in run])
            torch._foreach_copy_([states[i]["rs_norm"] for i in run], list(last.unbind(0)))
            add_back(update, torch.mul(batching.stacked([whole_dir[i] for i in run]),
                                       batching.per_matrix([-sizes[i] * group["scale"] for i in run], update, 3)),
                     batching.stacked([bases[i] for i in run]), plans[run[0]].side)
            batching.add_updates([weights[i] for i in run], update.unbind(0), decay)
            del update, last  # before the next run's: one run's residual alive at a time
        done = set(batched)
        for i in range(len(params)):  # the rest (no batch): one by one, Fira's term limited per matrix
            if i not in done:
                residual = (limited(residual_of(i), sums[len(fira_runs) + singles.index(i)].sqrt(), states[i]["rs_norm"],
                                    group["norm_growth_limit"]) if i in ratios else None)
                self._apply(weights[i], project_back(whole_dir[i], bases[i], plans[i].side), sizes[i], group, plans[i],
                            residual)
        return counters

    def _byte_runs(self, indices: list[int], nbytes) -> list[list[int]]:
        """``indices`` in consecutive runs of at most ``coalesce_bytes`` (``nbytes(i)`` each)."""
        runs: list[list[int]] = []
        held = 0
        for i in indices:
            if runs and held + nbytes(i) <= self.coalesce_bytes:
                runs[-1].append(i)
                held += nbytes(i)
            else:
                runs.append([i])
                held = nbytes(i)
        return runs

    def _project_batched(self, grads: list[torch.Tensor], bases: list[torch.Tensor], side: str) -> list[torch.Tensor]:
        """This rank's ``G Q`` (right) or partial ``P^T G`` (left) of each pair, by batches of one shape:
        one ``bmm`` per batch of at most ``coalesce_bytes`` of stacked gradients."""
        out: list[torch.Tensor] = [grads[0]] * len(grads) if grads else []
        for members in _classes(range(len(grads)), lambda j: (grads[j].shape, bases[j].shape, grads[j].dtype)).values():
            for run in self._byte_runs(members, lambda j: 4 * grads[j].numel()):
                stacked = torch.stack([grads[j] for j in run],  # converted to fp32 as they are copied
                                      out=self._scratch(None, (len(run), *grads[run[0]].shape), grads[run[0]]))
                low = project_local(stacked, batching.stacked([bases[j] for j in run]), side)
                del stacked  # before the next run's: one run's stack alive at a time
                for j, piece in zip(run, low.unbind(0)):  # one op, not a select per matrix
                    out[j] = piece
        return out

    def _accumulate_batched(self, weights: list[torch.Tensor], directions: list[torch.Tensor], bases: list[torch.Tensor],
                            coefs: list[float] | None, sides: list[str], decay: float) -> None:
        """``w <- w - decay w + c back(N)`` for each (``coefs``: ``c``, or ``None``: the directions come
        scaled), by batches of one shape: the scaled directions stacked, one ``bmm`` and one update
        kernel (:func:`batching.add_updates`) per batch of at most ``coalesce_bytes`` of updates."""
        for (_, _, _, side), members in _classes(range(len(weights)), lambda j: (
                weights[j].shape, directions[j].shape, bases[j].shape, sides[j])).items():
            for run in self._byte_runs(members, lambda j: 4 * weights[j].numel()):
                # A gathered class of directions is read (and scaled) where it lies, with no stack.
                scaled = batching.stacked([directions[j] for j in run])
                if coefs is not None:
                    scaled = torch.mul(scaled, batching.per_matrix([coefs[j] for j in run], scaled, 3))
                update = project_back(scaled, batching.stacked([bases[j] for j in run]), side)
                del scaled
                batching.add_updates([weights[j] for j in run], update.unbind(0), decay)
                del update  # before the next run's: one run's update alive at a time

