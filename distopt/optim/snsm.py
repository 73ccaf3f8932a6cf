"""AdamSNSM: Subset-Norm second moment + Subspace-Momentum (Nguyen & Nguyen, ICML 2025)."""

from __future__ import annotations

import math

import torch

from ..core import batching, comm, subspace
from ..core.options import check_option
from ..core.projector import add_back, project_local
from ..core.routing import LINEAR_ROLES
from ..core.shard import MatrixShardView, local
from . import first_moment_subspace
from .base import SubspaceOptimizer, adam_direction, apply_update, hyperparameters

MOMENT_POLICIES = first_moment_subspace.POLICIES


def subsets_are_rows(global_shape: tuple[int, int]) -> bool:
    """Subsets run along the shorter side: one per row when ``m >= n``, one per column otherwise."""
    return global_shape[0] >= global_shape[1]


class AdamSNSM(SubspaceOptimizer):
    r"""AdamSNSM: momentum in a rank-``r`` subspace, plain SGD in its complement, and one second
    moment per subset (row or column) of each matrix.

    For each matrix ``W`` (global ``m x n``) with gradient ``G``, a GaLore basis ``B`` (``right``:
    ``proj(G) = G B``; ``left``: ``B^T G``; ``back`` maps back), step ``t`` and ``s`` the steps since
    the momentum was last reset (both counting the current one):

    .. math::
        \begin{aligned}
        &B \leftarrow \mathrm{refresh}(G),\ M \leftarrow 0 \quad \text{on refresh steps, before } M \text{ is updated}\\
        &M \leftarrow \beta_1 M + (1-\beta_1)\, \mathrm{proj}(G)\\
        &v_i \leftarrow \beta_2 v_i + (1-\beta_2) \textstyle\sum_{j \in S_i} G_j^2
          \quad (S_i = \text{row } i \text{ if } m \ge n, \text{ else column } i)\\
        &U = \mathrm{back}\big(M/(1-\beta_1^s)\big) + \big(G - \mathrm{back}(\mathrm{proj}(G))\big)\\
        &W \leftarrow W(1-\eta\lambda) - \eta\, \frac{U}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
        \end{aligned}

    with ``v`` broadcast over each subset. The subsets run along the shorter side, so ``v`` has
    ``max(m, n)`` entries, and each is a SUM of ``g^2`` over ``min(m, n)`` coordinates (not a mean):
    the denominator is about ``sqrt(min(m, n))`` times Adam's, so the matrix group wants roughly
    10x Adam's learning rate (the paper's 60M run uses 0.05 vs Adam's 0.005); pass
    ``elementwise={"lr": ...}`` to keep the AdamW group's lower. Every ``nn.Linear`` weight is a
    matrix, ``lm_head`` included; embeddings, norms and biases use AdamW.

    Defaults: ``lr=1e-2`` (10x Adam's 1e-3, as the reference README advises: ``V`` sums a whole
    subset, so the RMS it divides by is about ``sqrt(subset size)`` larger), ``rank=128``,
    ``update_proj_gap=100`` (the reference's 60M example; its command line gives 200 and then 100,
    and the last wins), ``refresh="randomized"``, ``stagger=True``, ``side="auto"`` (GaLore's:
    project the shorter side),
    ``moment_policy="reset"``, ``betas=(0.9, 0.999)``, ``eps=1e-6`` (the reference code's),
    ``weight_decay=0``, ``oversample=16``, ``power_iters=1``, ``adam_form="torch"``.

    Where we differ from the reference code (``timmytonga/sn-sm``), and why:
    - The momentum reset happens on the refresh step itself, before ``M`` is updated. The
      reference resets one step late, so its refresh step mixes old-basis coordinates into the new
      basis.
    - Bias correction: the momentum is corrected with the steps since its last reset (``s``), the
      second moment with the global step ``t``, and the complement (a raw gradient) not at all.
      The reference divides the whole numerator, complement included, by ``1 - beta1^t`` with the
      global ``t``: that inflates the complement up to ``1/(1-beta1)`` times in the first steps and
      damps the momentum for ~``1/(1-beta1)`` steps after every reset.
    - ``refresh="randomized"`` and ``stagger=True`` as in :class:`~distopt.optim.galore.GaLore`;
      ``refresh="svd", stagger=False`` is the paper's SVD every ``T`` steps.
    - ``adam_form="torch"`` adds ``eps`` to the bias-corrected RMS and decays before the step;
      ``"hf"`` is the reference's form (``eps`` on the raw RMS, decay after the step).
    - ``moment_policy`` may also be ``keep`` (the reference's ``overlap_state``) or ``rotate``; the
      bias correction then counts from step 1.
    - ``rank >= `` the projected side's length: the basis is the identity and the complement is
      empty (AdamSN with full momentum).

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's (``d =
    min(m, n)`` for ``side="auto"``): ``step`` (int64) + ``basis`` (d x r) + ``exp_avg`` (r x D) +
    ``exp_avg_sq`` (``m x 1`` if ``m >= n``, else ``1 x n``), fp32:
    ``8 + 4 (d r + r D + max(m, n))`` bytes; ``8 + 4 (m n + max(m, n))`` at full rank. Element-wise
    AdamW parameters of ``N`` elements: ``4 + 8 N``.

    In one process, fp32 matrices of one shape, side and rank (``torch`` form, below full rank)
    step as a batch: each refreshes on its own when due, then one ``bmm`` projects them all, the
    moments are packed in one buffer per state tensor (``core.batching``), one ``bmm`` maps the
    momentum back, and the weights take two ``torch._foreach_*`` calls. The numerator is full-size,
    so a batch holds at most ``coalesce_bytes`` of stacked gradients and numerators. Sharded
    matrices (a column subset's sum needs its all-reduce), the ``hf`` form and full rank step one
    by one.
    """

    algorithm = "snsm"
    matrix_roles = LINEAR_ROLES | {"lm_head"}
    shape_hparams = ("rank", "side")

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-2,
        rank: int = 128,
        update_proj_gap: int = 100,
        refresh: str = "randomized",
        stagger: bool = True,
        side: str = "auto",
        moment_policy: str = "reset",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        seed: int = 0,
        state_layout: str = "partitioned",
    ):
        super().__init__(params, hyperparameters(locals()))

    def _check_matrix_hparams(self, group: dict) -> None:
        subspace.check_subspace_hparams(group)
        check_option(group, "moment_policy", "choice", choices=MOMENT_POLICIES)
        check_option(group, "stagger", "bool")

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        subspace.allocate_basis(state, view, plan, p.device)
        state["exp_avg"] = torch.zeros(subspace.projected_shape(view, plan), dtype=torch.float32, device=p.device)
        shape = (view.local_rows, 1) if subsets_are_rows(view.global_shape) else (1, view.n)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    @staticmethod
    def subset_sq_sums(grad: torch.Tensor, view: MatrixShardView) -> torch.Tensor:
        """``sum g^2`` per subset: per local row (local), or per column (summed over row shards)."""
        sq = grad.square()
        if subsets_are_rows(view.global_shape):
            return sq.sum(dim=1, keepdim=True)
        return comm.all_reduce_sum(sq.sum(dim=0, keepdim=True), view.group)

    # -- same-shape matrices stepped together (one process) ------------------------------------
    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        def batch_key(p):
            return first_moment_subspace.batch_key(p, self._views[p], subspace.plan(self._views[p], group), group)

        # The stacked gradients (then the numerators, in place) and one more full-size temporary at a time.
        self._step_by_batches(group, params, batch_key, 2, lambda g, members, _: self._step_batch(g, members))

    def _step_batch(self, group: dict, params: list[torch.Tensor]) -> None:
        """:meth:`_step_with_basis` of same-shape matrices with one kernel per operation for all of
        them; the same numbers up to the rounding of the batched products."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        states, views = [self.state[p] for p in params], [self._views[p] for p in params]
        plans = [subspace.plan(view, group) for view in views]
        packing, steps_now = first_moment_subspace.refresh_batch(params, states, views, plans, group)
        basis, _ = packing.get("basis")  # read only: a refresh wrote into the slices already
        avg, avg_copied = packing.get("exp_avg")
        avg_sq, avg_sq_copied = packing.get("exp_avg_sq")
        side = plans[0].side
        grads = torch.stack([local(p.grad) for p in params]).float()
        low = project_local(grads, basis, side)
        avg.lerp_(low, 1.0 - beta1)
        sums = grads.square().sum(dim=2 if subsets_are_rows(views[0].global_shape) else 1, keepdim=True)
        avg_sq.mul_(beta2).add_(sums, alpha=1.0 - beta2)
        del sums
        counts = [subspace.moment_updates(step, plan, group) for step, plan in zip(steps_now, plans)]
        corrected = avg / batching.per_matrix([1.0 - beta1**c for c in counts], avg, 3)
        numerator = add_back(grads, corrected.sub_(low), basis, side)  # G + back(M / c - proj G), no temporary
        del corrected, low
        steps, steps_copied = packing.get("step")
        steps.add_(1)
        bias2 = batching.per_matrix([math.sqrt(1.0 - beta2 ** (step + 1)) for step in steps_now], avg_sq, 3)
        direction = numerator.div_(avg_sq.sqrt().div_(bias2).add_(eps))
        weights = [local(p) for p in params]
        if wd:
            torch._foreach_mul_(weights, 1.0 - lr * wd)
        torch._foreach_add_(weights, direction.unbind(0), alpha=-lr)
        for key, value, copied in (("exp_avg", avg, avg_copied), ("exp_avg_sq", avg_sq, avg_sq_copied),
                                   ("step", steps, steps_copied)):
            if copied:
                packing.store_back(key, value)

    def _refresh_request(self, group: dict, state: dict, view: MatrixShardView, grad: torch.Tensor):
        return first_moment_subspace.refresh_request(subspace.plan(view, group), state, group, view, grad)

    def _chunked_state(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], int]]:
        view = self._views[p]
        return subspace.distributed_state(view, subspace.plan(view, group), ("exp_avg",))

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        with subspace.whole_basis(state, view, plan) as work:
            self._step_with_basis(p, grad, work, group, view, plan)

    def _step_with_basis(self, p, grad, state: dict, group: dict, view: MatrixShardView, plan) -> None:
        step = int(state["step"])
        raw, grad = grad, grad.float()  # the refresh takes the gradient as received (see ProjectedAdam)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if subspace.refresh_due(step, plan, group):  # reset (per policy) before M is updated
            first_moment_subspace.refresh(raw, state, group, view, plan, step)
        beta1, beta2 = group["betas"]
        low = subspace.project_grad(grad, state, view, plan)
        exp_avg.lerp_(low, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).add_(self.subset_sq_sums(grad, view), alpha=1.0 - beta2)
        corrected = exp_avg / (1.0 - beta1 ** subspace.moment_updates(step, plan, group))
        if plan.full:
            numerator = corrected
        else:  # back(M / c) + (G - back(proj G)) = G + back(M / c - proj G)
            numerator = grad + subspace.back_project(corrected.sub_(low), state, view, plan)
        state["step"] += 1
        lr = float(group["lr"])
        # beta1=0: the momentum is already bias-corrected, only the second moment's correction remains
        direction, step_size = adam_direction(numerator, exp_avg_sq, step + 1, 0.0, beta2, group["eps"], lr,
                                              group["adam_form"])
        apply_update(p, direction, step_size, lr, group["weight_decay"], group["adam_form"])
