"""SubTrack++: Grassmannian subspace tracking with projection-aware moments and recovery scaling
(Rajabi et al., arXiv 2502.01586)."""

from __future__ import annotations

import math

import torch

from ..core import comm
from ..core.grassmann import geodesic_step, retract, tangent_projection, thin_svd
from ..core.options import check_option
from ..core.shard import MatrixShardView
from .base import hyperparameters
from .projected import ProjectedAdam


class SubTrack(ProjectedAdam):
    r"""SubTrack++: every T steps the basis takes one geodesic step that reduces the error of
    representing the current gradient in it, instead of a new SVD.

    For each matrix ``W`` (global ``m x n``) with gradient ``G`` and orthonormal basis ``S``
    (``d x r``) on the shorter side, write ``G_S`` for ``G`` oriented so that ``S`` acts on its rows
    (``G`` for a left basis, ``G^T`` for a right one). On refresh steps (``t > 0``):

    .. math::
        \begin{aligned}
        &A = \arg\min_A \|S A - G_S\|_F = (S^\top S)^{-1} S^\top G_S,\quad E = G_S - S A,\quad
          \nabla F = (I - S S^\top)(-2 E A^\top) \approx \sigma\, u v^\top\ (\text{top triplet})\\
        &\theta = \min\big(\eta\, \sigma / \|G\|_F^2,\ \theta_{\max}\big),\quad
          S' = (S v \cos\theta - u \sin\theta) v^\top + S (I - v v^\top)\\
        &C = S'^\top S,\quad
          (M, V) \leftarrow \mathrm{AO}_C(M, V)\ (\text{``transform'', }\texttt{core/moments.py}),\quad S \leftarrow S'
        \end{aligned}

    then, every step, Adam on ``R = proj(G)`` with Fira's recovery scaling, as in GrassJump:
    ``W <- W (1 - eta lambda) - eta (alpha back(N) + D_hat)``. Since ``sigma <= ||G||_F^2``, the angle
    is at most ``step_size`` radians; the step rotates one basis direction toward the residual.

    Defaults: ``lr=1e-3``, ``rank=128``, ``update_proj_gap=200`` (T), ``scale=0.25``,
    ``step_size=0.5`` (``eta``), ``max_angle=pi/2``, ``refresh="randomized"``,
    ``moment_policy="transform"`` (AO), ``recovery_scaling=True``, ``norm_growth_limit=1.01``.

    Where we differ from the reference code (``criticalml-uw/SubTrack``), deliberately:
    - Tracking works for ``m >= n`` too. The reference stores a right basis as ``r x n`` rows and
      applies ``(I_r - O O^T)``, which is zero for orthonormal rows, so its square and tall matrices
      never leave their initial SVD. Here a right basis is tracked on the transposed problem.
    - The step is scale-invariant: ``theta = eta sigma / ||G||_F^2`` instead of ``eta sigma``, which
      grows with the gradient's squared magnitude (the reference scripts need ``eta = 10`` for LLM
      gradients). ``step_size=0.5`` is our choice: it is the error-minimizing angle when the
      subspace already holds most of the gradient, and smaller than that otherwise.
    - AO is applied at the actual switch with the true previous basis. The reference computes ``C``
      against the initial basis (its update of the previous basis is commented out) one step early,
      and multiplies the transformed second moment by an extra ``(1 - beta2)``.
    - The first basis comes from ``refresh`` (the reference: a full SVD); the least squares and the
      tangent's SVD are computed on row shards with small all-reduces (TSQR for the SVD), and the
      basis is re-orthonormalized after each step (a no-op up to round-off).
    - Not implemented: ``use_acc_gradient`` (tracking the mean gradient since the last update; it
      needs an ``m x n`` buffer) and the ``iterative_decrease`` step-size schedule.
    - The recovery residual is ``G - back(R)``, not multiplied by ``alpha``; refreshes are staggered.

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's:
    ``step`` (int64) + ``basis`` (d x r) + ``exp_avg``, ``exp_avg_sq`` (r x D) + ``rs_norm`` (0-d),
    all fp32: ``8 + 4 (d r + 2 r D) + 4`` bytes (``8 + 4 (d r + 2 r D)`` with
    ``recovery_scaling=False``); ``8 + 8 m n`` at full rank. Unlike the reference, no copy of the
    previous basis is kept between steps.
    """

    algorithm = "subtrack"

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        step_size: float = 0.5,
        max_angle: float = math.pi / 2,
        refresh: str = "randomized",
        stagger: bool = True,
        side: str = "auto",
        moment_policy: str = "transform",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        recovery_scaling: bool = True,
        norm_growth_limit: float = 1.01,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        projection_precision: str = "fp32",
        compile: bool = False,
        state_layout: str = "partitioned",
        seed: int = 0,
    ):
        super().__init__(params, hyperparameters(locals()))

    def _check_algorithm_hparams(self, group: dict) -> None:
        check_option(group, "step_size", low=0, low_open=True, note="radians per unit of sigma/||G||^2")
        check_option(group, "max_angle", low=0, low_open=True, high=math.pi / 2, note="radians, at most pi/2")

    def _data_method(self, group: dict, step: int) -> str | None:
        return group["refresh"] if step == 0 else None

    def projected_sync_refusal(self, group: dict) -> str | None:
        return ("subtrack's tracking step uses the residual G - S A and the norm of G, which need the full "
                "averaged G")

    def _new_basis(self, grad, state, group, view: MatrixShardView, plan, step: int, index: int):
        if method := self._data_method(group, step):
            return self._data_basis(method, grad, state, group, view, plan, step, index)
        return self.track(state["basis"], grad, group, view, plan)[0]

    @classmethod
    def track(cls, basis: torch.Tensor, grad: torch.Tensor, group: dict, view: MatrixShardView, plan):
        """One tracking step; returns ``(new basis, angle)``. Correct on row shards of ``grad``."""
        grad = grad.float()
        if plan.side == "left":  # S: m x r, rows sharded like G
            gram = comm.all_reduce_sum(basis.T @ basis, view.group)
            coef = torch.linalg.solve(gram, comm.all_reduce_sum(basis.T @ grad, view.group))  # r x n
            error = grad - basis @ coef  # this rank's rows of G - S A
            euclid = -2.0 * (error @ coef.T)  # this rank's rows of the m x r gradient of F
        else:  # S: n x r, replicated; the problem is G^T = S A with A (r x m) column-sharded
            gram = basis.T @ basis
            coef = torch.linalg.solve(gram, (grad @ basis).T).T  # this rank's rows of A^T (rows x r)
            error = grad - coef @ basis.T  # this rank's rows of (G^T - S A)^T
            euclid = -2.0 * comm.all_reduce_sum(error.T @ coef, view.group)  # n x r, summed over rows
        shard_group, counts = cls.basis_layout(view, plan)
        tangent = tangent_projection(basis, euclid, shard_group)
        u, s, v = thin_svd(tangent, shard_group, counts)
        energy = comm.all_reduce_sum(grad.square().sum(), view.group)
        ratio = torch.where(energy > 0, s[0] / energy.clamp_min(torch.finfo(energy.dtype).tiny), torch.zeros_like(energy))
        angle = (group["step_size"] * ratio).clamp(max=group["max_angle"])
        new = geodesic_step(basis, -u[:, :1], angle.reshape(1), v[:, :1])
        return retract(new, shard_group, counts).contiguous(), angle
