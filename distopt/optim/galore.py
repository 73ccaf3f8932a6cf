"""GaLore: Adam on gradients projected to a rank-r subspace (Zhao et al., 2024)."""

from __future__ import annotations

import torch

from ..core import subspace
from ..core.routing import LINEAR_ROLES
from ..core.shard import MatrixShardView
from .base import SubspaceOptimizer, adam_direction, apply_update, update_moments


class GaLore(SubspaceOptimizer):
    r"""GaLore with a sharding-aware, staggered, randomized subspace refresh.

    For each matrix ``W`` (global ``m x n``) with gradient ``G`` and a rank-``r`` orthonormal basis
    ``B`` on one side (``right``: ``R = G B``; ``left``: ``R = B^T G``):

    .. math::
        \begin{aligned}
        &B \leftarrow \mathrm{refresh}(G) \text{ on the matrix's refresh steps (moments per policy)}\\
        &M \leftarrow \beta_1 M + (1-\beta_1) R, \quad V \leftarrow \beta_2 V + (1-\beta_2) R^2\\
        &W \leftarrow W(1 - \eta\lambda) - \eta\,\alpha\,\mathrm{back}\Big(\frac{M/(1-\beta_1^t)}
          {\sqrt{V/(1-\beta_2^t)} + \epsilon}\Big)
        \end{aligned}

    where ``back(N)`` is ``N B^T`` (right) or ``B N`` (left) and ``alpha`` is ``scale``.

    Defaults and where we differ from the paper's code (galore-torch):
    - ``refresh="randomized"`` (warm-started range finder, ``power_iters`` passes) and
      ``stagger=True`` (refresh phase from a hash of the name): no step refreshes every matrix, and a
      refresh costs O(mnk) instead of a full SVD. ``refresh="svd", stagger=False`` is the paper's rule.
    - State and basis are fp32 and the basis holds exactly ``d x r`` (no view of a full ``U``/``V``).
    - ``adam_form="torch"`` puts ``eps`` where torch.optim.AdamW does; ``"hf"`` is galore-torch's
      form (``eps`` on the raw RMS, decay after the step) and reproduces it step for step.
    - ``rank >= d`` (the projected side's length) means the subspace is the whole space: the basis is
      the identity and the step is AdamW's exactly.
    - ``moment_policy`` (``keep`` in the paper) can also be ``reset``, ``rotate`` or ``transform``.

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's:
    ``step`` (int64) + ``basis`` (d x r) + ``exp_avg``, ``exp_avg_sq`` (r x D), all fp32:
    ``8 + 4 (d r + 2 r D)`` bytes; ``8 + 8 m n`` at full rank.
    """

    algorithm = "galore"
    matrix_roles = LINEAR_ROLES
    shape_hparams = ("rank", "side")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        refresh: str = "randomized",
        stagger: bool = True,
        side: str = "auto",
        moment_policy: str = "keep",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, refresh=refresh, stagger=stagger,
            side=side, moment_policy=moment_policy, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            oversample=oversample, power_iters=power_iters, adam_form=adam_form, seed=seed,
        )
        super().__init__(params, defaults)

    def _check_matrix_hparams(self, group: dict) -> None:
        subspace.check_subspace_hparams(group)
        if not isinstance(group["scale"], (int, float)) or not group["scale"] == group["scale"]:
            raise ValueError(f"scale={group['scale']!r}: must be a finite number")

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        subspace.allocate_basis(state, view, plan, p.device)
        shape = subspace.projected_shape(view, plan)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = subspace.plan(view, group)
        step = int(state["step"])
        grad = grad.float()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if subspace.refresh_due(step, plan, group):
            subspace.refresh(state, grad, view, plan, group, step, exp_avg, exp_avg_sq)
        low = subspace.project_grad(grad, state, view, plan)
        beta1, beta2 = group["betas"]
        update_moments(exp_avg, exp_avg_sq, low, beta1, beta2, group["adam_form"])
        state["step"] += 1
        lr = float(group["lr"])
        direction, step_size = adam_direction(exp_avg, exp_avg_sq, step + 1, beta1, beta2, group["eps"], lr, group["adam_form"])
        update = subspace.back_project(direction, state, plan)
        if group["scale"] != 1:
            update = update * group["scale"]
        apply_update(p, update, step_size, lr, group["weight_decay"], group["adam_form"])
