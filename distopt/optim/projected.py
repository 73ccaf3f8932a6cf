"""Shared machinery of the subspace-Adam family whose algorithms differ only in how the basis moves.

GoLore, GrassJump, GrassWalk and SubTrack all run Adam on ``R = proj(G)`` in a rank-``r`` basis,
optionally add Fira's recovery-scaled residual, and change the basis on a staggered schedule. This
module holds that loop once; each algorithm file implements :meth:`ProjectedAdam._new_basis`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import cast

import torch

from ..core import comm, subspace
from ..core.linalg import stable_seed
from ..core.moments import apply_moment_policy
from ..core.options import check_option
from ..core.projector import (
    RangeRequest,
    SvdRequest,
    accumulate_back,
    change_of_basis,
    compute_basis,
    prepared_bases,
    project,
    project_back,
    random_basis,
    unseen_fraction,
)
from ..core.recovery import channel_ratio, check_recovery_hparams, limited, recovery_term, scaled_residual
from ..core.routing import LINEAR_ROLES
from ..core.schedule import refresh_index
from ..core.shard import MatrixShardView, local
from .base import SubspaceOptimizer, adam_direction, apply_update, tf32_matmuls, update_moments

PROJECTION_PRECISIONS = ("fp32", "tf32")


def projection_matmuls(group: dict):
    """The precision of ``proj(G)``, ``back(N)`` and Fira's ``back(R)`` on CUDA: fp32 by default;
    ``tf32`` lets those matmuls (never a refresh, whose Gram and range finder stay fp32) run on TF32
    tensor cores."""
    return tf32_matmuls(True) if group["projection_precision"] == "tf32" else contextlib.nullcontext()


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
    default ``fp32`` holds the step to fp32 whatever the global TF32 flags.

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
    """

    matrix_roles = LINEAR_ROLES
    shape_hparams = ("rank", "side", "recovery_scaling")

    # -- validation ----------------------------------------------------------------------------
    def _check_matrix_hparams(self, group: dict) -> None:
        subspace.check_subspace_hparams(group)
        check_option(group, "scale", low=0, low_open=True, note="GaLore's alpha, e.g. 0.25")
        check_option(group, "projection_precision", "choice", choices=PROJECTION_PRECISIONS)
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
        step = int(state["step"])
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

    @staticmethod
    def _adam_batched(lows: list, states: list[dict], plans: list, group: dict) -> tuple[Sequence[torch.Tensor], list[float]]:
        """:meth:`_adam_in_subspace` over a list (the ``torch`` form), as ``torch._foreach_*`` calls:
        the moments of ``lows``, each step counter advanced, the directions and step sizes ``lr / c_1``."""
        beta1, beta2 = group["betas"]
        counts = [subspace.moment_updates(int(state["step"]), plan, group) for state, plan in zip(states, plans)]
        torch._foreach_add_([state["step"] for state in states], 1)
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

    def _step_batched(self, group: dict, params: list[torch.Tensor]) -> None:
        """One step of ``params`` with the element-wise math over all of them at once.

        Per matrix: its refresh when one is due, then ``R = proj(G)`` (one matmul) and, at the end,
        ``W -= step alpha back(N)`` accumulated into ``W`` by ``addmm_`` (no full-size temporary).
        Adam's moments, its direction ``N`` and the weight decay are ``torch._foreach_*`` calls over
        the whole list, so the launches per matrix are two matmuls. Fira's recovery term stays per
        matrix (a full-size residual each, made and applied one at a time). The numbers are the
        per-matrix path's up to the rounding of the fused accumulation."""
        lr, wd, scale = float(group["lr"]), group["weight_decay"], group["scale"]
        weights: list[torch.Tensor]
        bases: list[torch.Tensor]
        plans: list[subspace.SubspacePlan]
        lows: list[torch.Tensor]
        states: list[dict]
        weights, bases, plans, lows, states = [], [], [], [], []
        unaveraged: list[int] = []  # lows whose replicas' average is still to take (not prepared)
        fira = {}  # index -> (gradient, view) of the matrices with a recovery term
        for p in params:
            w, grad, state, view = local(p), local(p.grad), self.state[p], self._views[p]
            plan = subspace.plan(view, group)
            with subspace.whole_basis(state, view, plan) as work:  # fp32: a bf16 basis converted, stored back
                self._refresh_if_due(grad, work, group, view, plan)
            prepared = self._prepared_lows.pop(view.name, None)
            if prepared is not None:
                lows.append(prepared)
            else:
                with projection_matmuls(group):  # replicas' averages below, in one collective
                    lows.append(subspace.project_grad(grad.float(), work, view, plan, average=False))
                unaveraged.append(len(lows) - 1)
            if "rs_norm" in state:
                fira[len(weights)] = (grad, view)
            weights.append(w)
            bases.append(work["basis"])
            plans.append(plan)
            states.append(state)
        groups = {id(self._views[params[i]].replicas): self._views[params[i]].replicas for i in unaveraged}
        if len(groups) == 1 and (replicas := next(iter(groups.values()))) is not None:
            averaged = comm.replica_mean_coalesced([lows[i] for i in unaveraged], replicas)  # one collective
            for i, low in zip(unaveraged, averaged):
                lows[i] = low
        elif len(groups) > 1:  # matrices synced over different groups (or some not): one at a time
            for i in unaveraged:
                lows[i] = comm.replica_mean(lows[i], self._views[params[i]].replicas)
        directions, sizes = self._adam_batched(lows, states, plans, group)
        if wd:
            torch._foreach_mul_(weights, 1.0 - lr * wd)
        with projection_matmuls(group):
            for i, (w, basis, plan, direction, size) in enumerate(zip(weights, bases, plans, directions, sizes)):
                accumulate_back(w, direction, basis, plan.side, -size * scale)
                if i in fira:  # one full-size residual alive at a time
                    grad, view = fira[i]
                    residual = recovery_term(grad.float(), lows[i], direction, basis, plan.side, view,
                                             states[i]["rs_norm"], group["norm_growth_limit"])
                    w.add_(residual, alpha=-size)

    # -- plain steps of several matrices, with their collectives coalesced ---------------------------
    # Bytes of whole bases and r x n sums a bucket holds at once: what a plain step's coalescing adds
    # to memory, for one collective of each kind per bucket instead of one per matrix. About what FSDP2
    # holds gathered for two LLaMA-7B layers in bf16 during forward and backward, which is free during
    # the optimizer step. Set it on the optimizer (``optimizer.coalesce_bytes = ...``) to trade.
    coalesce_bytes = 768 << 20

    def _coalescible(self, p: torch.Tensor, group: dict) -> bool:
        """A plain step of a sharded, projected matrix with collectives to coalesce: its basis gather
        (right, chunked), its ``P^T G`` reduction and direction gather (left), Fira's norm."""
        view, state = self._views[p], self.state[p]
        if not view.sharded or comm.world_size(view.group) == 1:
            return False
        plan = subspace.plan(view, group)
        return (not plan.full and not subspace.refresh_due(int(state["step"]), plan, group)
                and (plan.side == "left" or plan.basis_chunked or "rs_norm" in state))

    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        coalesced = [p for p in params if self._coalescible(p, group)]
        chosen = {id(p) for p in coalesced}
        batched = [p for p in params if id(p) not in chosen and self._batchable(p, group)]
        chosen.update(id(p) for p in batched)
        for p in params:
            if id(p) not in chosen:
                self._matrix_step(local(p), local(p.grad), self.state[p], group, self._views[p])
        # R and N of a chunk are alive at once (and the fp32 copies of bf16 bases): at most coalesce_bytes.
        copies = 4 if subspace.basis_dtype(group) != torch.float32 else 0
        for chunk in self._chunks(group, batched, lambda view, plan: 8 * plan.rank * (
                view.local_rows if plan.side == "right" else view.n) + copies * plan.rank * subspace.side_dim(
                plan.side, view.global_shape)):
            self._step_batched(group, chunk)
        # The same buckets on every rank: they follow the global shapes and step counts.
        for bucket in self._chunks(group, coalesced, lambda view, plan: 4 * view.n * plan.rank * (
                2 if plan.side == "left" else 1), same_group=True):
            with projection_matmuls(group):
                self._step_bucket(group, bucket)

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

    def _step_bucket(self, group: dict, params: list[torch.Tensor]) -> None:
        """Plain steps of ``params`` (one process group) with one collective per kind: the right bases
        all-gathered together, the left sides' ``P^T G`` reduced together (a reduce-scatter into
        column chunks when partitioned, else an all-reduce) and their directions gathered together.
        The same numbers as stepping them one by one."""
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
        chunked_right = [i for i in right if plans[i].basis_chunked]
        gathered = comm.all_gather_rows_coalesced(
            [(states[i]["basis"], views[i].chunk_counts(views[i].n)) for i in chunked_right], pg)
        bases.update(zip(chunked_right, gathered))
        bases = {i: basis.float() for i, basis in bases.items()}  # bf16 storage: gathered at 2 bytes, used in fp32
        # Projections taken ahead by clip_grad_norm_ (reduced and averaged already) are used as they are.
        prepared = {i: low for i, view in enumerate(views) if (low := self._prepared_lows.pop(view.name, None)) is not None}
        lows = {i: project(grads[i].float(), bases[i], "right", None) for i in right if i not in prepared}
        todo = [i for i in left if i not in prepared]
        sums = [project(grads[i].float(), bases[i], "left", None) for i in todo]  # this rank's partial sums
        if all(plans[i].columns_chunked for i in todo):
            reduced = comm.reduce_scatter_cols_coalesced(
                [(total, views[i].chunk_counts(views[i].n)) for i, total in zip(todo, sums)], pg)
        else:  # replicated r x n sums (the layout is one per group, so all or none are chunked)
            reduced = comm.all_reduce_sum_coalesced(sums, pg)
        lows.update(zip(todo, reduced))
        if views[0].replicas is not None:  # projected sync: the averages, in one collective
            order = sorted(lows)
            lows.update(zip(order, comm.replica_mean_coalesced([lows[i] for i in order], views[0].replicas)))
        lows.update(prepared)
        if group["adam_form"] == "torch":
            listed, steps = self._adam_batched([lows[i] for i in range(len(params))], states, plans, group)
            directions, sizes = dict(enumerate(listed)), dict(enumerate(steps))
        else:
            directions, sizes = {}, {}
            for i in range(len(params)):
                directions[i], sizes[i] = self._adam_in_subspace(lows[i], states[i], group, plans[i],
                                                                 int(states[i]["step"]))
        # Fira's ratio is local along the projected side; a left side in column chunks gathers its R and
        # ratio with its direction, in the same collective.
        fira = [i for i in range(len(params)) if "rs_norm" in states[i]]
        ratios = {i: channel_ratio(lows[i], directions[i], plans[i].side) for i in fira}
        gather = [i for i in left if plans[i].columns_chunked]
        packed = [torch.cat([directions[i], lows[i], ratios[i][None]]) if i in ratios else directions[i] for i in gather]
        wholes = comm.all_gather_cols_coalesced(
            [(block, views[i].chunk_counts(views[i].n)) for i, block in zip(gather, packed)], pg)
        whole_dir, whole_low, whole_ratio = dict(directions), dict(lows), dict(ratios)
        for i, block in zip(gather, wholes):
            r = plans[i].rank
            whole_dir[i] = block[:r]
            if i in ratios:
                whole_low[i], whole_ratio[i] = block[r : 2 * r], block[2 * r]
        def scaled(i):  # computed twice (for the norm, then for the update) rather than held for all
            return scaled_residual(grads[i].float(), whole_low[i], whole_ratio[i], bases[i], plans[i].side)

        norms = comm.all_reduce_sum_coalesced([scaled(i).square().sum() for i in fira], pg)
        for i, p in enumerate(params):
            residual = None
            if i in ratios:
                residual = limited(scaled(i), norms[fira.index(i)].sqrt(), states[i]["rs_norm"], group["norm_growth_limit"])
            w = local(p)
            if group["adam_form"] == "torch" and w.dtype == torch.float32:  # back(N) accumulated into W
                if group["weight_decay"]:
                    w.mul_(1.0 - float(group["lr"]) * group["weight_decay"])
                accumulate_back(w, whole_dir[i], bases[i], plans[i].side, -sizes[i] * group["scale"])
                if residual is not None:
                    w.add_(residual, alpha=-sizes[i])
                continue
            update = project_back(whole_dir[i], bases[i], plans[i].side)
            self._apply(w, update, sizes[i], group, plans[i], residual)
