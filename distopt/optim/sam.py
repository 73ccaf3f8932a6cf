"""SAM, "Subspace-Adaptive Momentum" (seed 000): rank-k momentum over a full second moment."""

from __future__ import annotations

import math

import torch

from ..core import batching, subspace
from ..core.options import check_option
from ..core.projector import REFRESH_METHODS, project_back, project_local
from ..core.routing import LINEAR_ROLES
from ..core.shard import MatrixShardView, local
from . import first_moment_subspace
from .base import SubspaceOptimizer, adam_direction, apply_update, hyperparameters

MOMENT_POLICIES = first_moment_subspace.POLICIES


def sam_rank(global_shape: tuple[int, int], rank: int | None) -> int:
    """``k = min(5, floor(m / 10))`` (at least 1) from the global shape, or ``rank`` if given;
    never more than ``min(m, n)``."""
    m, n = global_shape
    k = max(1, min(5, m // 10)) if rank is None else rank
    return min(k, m, n)


class SAM(SubspaceOptimizer):
    r"""SAM: momentum in a rank-``k`` left subspace of the gradient, divided by a full second moment.

    For each matrix ``W`` (global ``m x n``) with gradient ``G``, a left basis ``U_k`` (``m x k``,
    orthonormal) of the top-``k`` column space of ``G`` refreshed every ``update_proj_gap`` steps:

    .. math::
        \begin{aligned}
        &U_k \leftarrow \mathrm{top}_k(G) \text{ on the matrix's refresh steps}\\
        &M \leftarrow \beta_1 M + (1-\beta_1)\, U_k^\top G, \qquad V \leftarrow \beta_2 V + (1-\beta_2)\, G^2\\
        &W \leftarrow W(1 - \eta\lambda) - \eta\, \frac{U_k M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t) + \epsilon}}
        \end{aligned}

    ``M`` is ``k x n``; ``V`` is the full ``m x n`` element-wise second moment of the raw gradient,
    so the numerator is rank ``k`` but the step is not. ``k = min(5, floor(m/10))`` from the
    global shape, at least 1 (``rank=`` overrides it; capped at ``min(m, n)``; ``k >= m`` uses
    the identity basis). The orthogonal complement of ``U_k`` is discarded, as in the seed.

    Defaults: ``lr=3e-4`` (the seed's only run, 134M), ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``eps_inside_sqrt=True``,
    ``weight_decay=0``, ``rank=None`` (the rule above), ``update_proj_gap=200``,
    ``refresh="randomized"``, ``stagger=True``, ``moment_policy="rotate"``, ``oversample=16``,
    ``power_iters=1``, ``adam_form="torch"``.
    Applies to attention and MLP linears; embeddings, ``lm_head``, norms and biases use AdamW.

    The seed leaves most of the method open; our choices, and why:
    - ``T`` (not given): 200, GaLore's value; ``beta1``, ``beta2``: Adam's defaults.
    - ``M`` and ``V`` rules (not given): the EMAs above, ``M`` of the projected gradient and ``V``
      of the full gradient, with Adam's bias correction. ``V``'s counts from the first step; ``M``'s
      too, except under ``moment_policy="reset"``, where it counts the updates since the last reset
      (``t`` in ``1 - beta1^t`` restarts), so a fresh momentum is not divided down for 10 steps.
    - ``eps`` sits inside the square root, as the seed prints (``sqrt(v + eps)``), which floors the
      denominator at ``sqrt(eps)`` (1e-4 at the default). This matters more here than in Adam: the
      numerator is rank ``k`` but ``V`` is element-wise, so where a coordinate's gradient is tiny
      and the low-rank numerator is not, the ratio explodes. With Adam's placement
      (``eps_inside_sqrt=False``) we measured ratios above 1000 on a small model and runs that
      amplify rounding (a 1e-7 relative change of the gradients moved weights by 1e-3 within
      four steps, so sharded and single-process runs drift apart).
    - ``M`` at a basis change (not given): ``rotate`` maps it into the new basis with
      ``M <- (U_new^T U_old) M``, so momentum along directions both bases share survives; ``keep``
      (GaLore's) and ``reset`` are available.
    - The basis: the seed asks for a truncated SVD; the default is the warm-started randomized
      range finder (near-exact at ``k <= 5`` with 16 oversampling columns, and no full-matrix
      gather when row-sharded). ``refresh="svd"`` is the seed's rule.
    - Which parameters (not given): the linears of attention and MLP, as GaLore.
    The seed's memory claim (32.7 MB vs 3957 MB for AdamW at 134M parameters) cannot hold with a
    full ``V``; the formula below is what this method actually stores.

    State per matrix: ``step`` (int64) + ``basis`` (m x k) + ``exp_avg`` (k x n) +
    ``exp_avg_sq`` (m x n), fp32: ``8 + 4 (m k + k n + m n)`` bytes (``8 + 8 m n`` when
    ``k >= m``). Element-wise AdamW parameters of ``N`` elements: ``4 + 8 N``. Row-sharded over
    ``N`` ranks, ``basis`` and ``exp_avg_sq`` hold this rank's rows and ``exp_avg`` its ``n/N``
    columns (``state_layout="partitioned"``, the default; ``"replicated"`` keeps ``exp_avg`` whole).

    In one process, fp32 matrices of one shape and rank (``torch`` form, below full rank) step as a
    batch: each refreshes on its own when due, then one ``bmm`` projects them all, the moments
    (``V`` included) are packed in one buffer per state tensor (``core.batching``), one ``bmm`` maps
    the momentum back into the stacked gradients' buffer, the division by the stacked
    denominators is one kernel, and the weights take one more. Two full-size temporaries per
    member (the stacked gradients, then numerators, and the denominators), so a batch holds at most
    ``coalesce_bytes`` of them. Sharded matrices (``U_k^T G`` needs its all-reduce per matrix), the
    ``hf`` form and full rank step one by one.
    """

    algorithm = "sam"
    matrix_roles = LINEAR_ROLES
    shape_hparams = ("rank",)

    def __init__(
        self,
        params,
        *,
        lr: float = 3e-4,
        rank: int | None = None,
        update_proj_gap: int = 200,
        refresh: str = "randomized",
        stagger: bool = True,
        moment_policy: str = "rotate",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = True,
        weight_decay: float = 0.0,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        seed: int = 0,
        state_layout: str = "partitioned",
    ):
        super().__init__(params, hyperparameters(locals()))

    def _check_matrix_hparams(self, group: dict) -> None:
        check_option(group, "rank", "int", low=1, optional="for min(5, m // 10)")
        check_option(group, "update_proj_gap", "int", low=1)
        check_option(group, "refresh", "choice", choices=REFRESH_METHODS)
        check_option(group, "moment_policy", "choice", choices=MOMENT_POLICIES)
        for key in ("stagger", "eps_inside_sqrt"):
            check_option(group, key, "bool")
        for key in ("oversample", "power_iters"):
            check_option(group, key, "int", low=0)
        subspace.check_state_layout(group)

    @staticmethod
    def plan(view: MatrixShardView, group: dict) -> subspace.SubspacePlan:
        """Always a left basis (``U_k``), whatever the shape; the rank from the global shape."""
        k = sam_rank(view.global_shape, group["rank"])
        return subspace.make_plan(view, group, "left", k, k >= view.m)

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = self.plan(view, group)
        subspace.allocate_basis(state, view, plan, p.device)
        state["exp_avg"] = torch.zeros(subspace.projected_shape(view, plan), dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros((view.local_rows, view.n), dtype=torch.float32, device=p.device)

    def _refresh_request(self, group: dict, state: dict, view: MatrixShardView, grad: torch.Tensor):
        return first_moment_subspace.refresh_request(self.plan(view, group), state, group, view, grad)

    def _chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        view = self._views[p]
        return subspace.distributed_state(view, self.plan(view, group), ("exp_avg",))

    # -- same-shape matrices stepped together (one process) ------------------------------------
    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        def batch_key(p):
            return first_moment_subspace.batch_key(p, self._views[p], self.plan(self._views[p], group), group)

        # The stacked gradients (then the numerators, in place) and the denominators.
        self._step_by_batches(group, params, batch_key, 2, lambda g, members, _: self._step_batch(g, members))

    def _step_batch(self, group: dict, params: list[torch.Tensor]) -> None:
        """:meth:`_matrix_step` of same-shape matrices with one kernel per operation for all of them;
        the same numbers up to the rounding of the batched products."""
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), group["eps"]
        states, views = [self.state[p] for p in params], [self._views[p] for p in params]
        plans = [self.plan(view, group) for view in views]
        packing, steps_now = first_moment_subspace.refresh_batch(params, states, views, plans, group)
        basis, _ = packing.get("basis")  # read only: a refresh wrote into the slices already
        avg, avg_copied = packing.get("exp_avg")
        avg_sq, avg_sq_copied = packing.get("exp_avg_sq")
        grads = torch.stack([local(p.grad) for p in params]).float()
        avg.lerp_(project_local(grads, basis, "left"), 1.0 - beta1)
        avg_sq.mul_(beta2).addcmul_(grads, grads, value=1.0 - beta2)
        # -lr U M / c_1 into the gradients' buffer (they are read: V and M hold them now).
        since = [subspace.moment_updates(step, plan, group) for step, plan in zip(steps_now, plans)]
        numerator = project_back(avg, basis, "left", out=grads)
        numerator.mul_(batching.per_matrix([-lr / (1.0 - beta1**count) for count in since], numerator, 3))
        if group["eps_inside_sqrt"]:
            c2 = batching.per_matrix([1.0 - beta2 ** (step + 1) for step in steps_now], avg_sq, 3)
            denominator = torch.div(avg_sq, c2).add_(eps).sqrt_()
        else:
            bias2 = batching.per_matrix([math.sqrt(1.0 - beta2 ** (step + 1)) for step in steps_now], avg_sq, 3)
            denominator = avg_sq.sqrt().div_(bias2).add_(eps)
        numerator.div_(denominator)
        del denominator
        steps, steps_copied = packing.get("step")
        steps.add_(1)
        batching.add_updates([local(p) for p in params], numerator.unbind(0), lr * group["weight_decay"])
        for key, value, copied in (("exp_avg", avg, avg_copied), ("exp_avg_sq", avg_sq, avg_sq_copied),
                                   ("step", steps, steps_copied)):
            if copied:
                packing.store_back(key, value)

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = self.plan(view, group)
        step = int(state["step"])
        raw, grad = grad, grad.float()  # the refresh takes the gradient as received (see ProjectedAdam)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if subspace.refresh_due(step, plan, group):
            first_moment_subspace.refresh(raw, state, group, view, plan, step)
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(subspace.project_grad(grad, state, view, plan), 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        state["step"] += 1
        lr = float(group["lr"])
        # M's bias correction counts its updates since its last reset; V is never reset.
        since = subspace.moment_updates(step, plan, group)
        numerator = subspace.back_project(exp_avg, state, view, plan) / (1.0 - beta1**since)
        form, eps = group["adam_form"], group["eps"]
        if group["eps_inside_sqrt"]:
            c2 = 1.0 - beta2 ** (step + 1)
            if form == "hf":  # raw V, correction folded into the step size
                direction, step_size = numerator / (exp_avg_sq + eps).sqrt(), lr * math.sqrt(c2)
            else:
                direction, step_size = numerator / (exp_avg_sq / c2 + eps).sqrt(), lr
        else:
            direction, step_size = adam_direction(numerator, exp_avg_sq, step + 1, 0.0, beta2, eps, lr, form)
        apply_update(p, direction, step_size, lr, group["weight_decay"], form)
