"""GrassJump: a fresh Haar subspace every T steps, with projection-aware moments and recovery
scaling (Rajabi et al., arXiv 2510.01878)."""

from __future__ import annotations

from ..core.shard import MatrixShardView
from .base import hyperparameters
from .projected import ProjectedAdam


class GrassJump(ProjectedAdam):
    r"""GrassJump: SubTrack++'s framework with the subspace update replaced by a jump to a uniformly
    random point of the Grassmannian, independent of the gradient.

    For each matrix ``W`` (global ``m x n``) with gradient ``G`` and orthonormal basis ``S``
    (``d x r``) on the shorter side (``right``: ``R = G S``; ``left``: ``R = S^T G``):

    .. math::
        \begin{aligned}
        &\text{on refresh steps } (t > 0)\text{: } S' = \mathrm{qr}(Z),\ Z_{ij} \sim \mathcal N(0,1)
          \ (\text{Haar}),\quad C = S'^\top S\\
        &\quad (M, V) \leftarrow \mathrm{AO}_C(M, V)\ (\text{``transform'', }\texttt{core/moments.py}),\quad S \leftarrow S'\\
        &M \leftarrow \beta_1 M + (1-\beta_1) R, \quad V \leftarrow \beta_2 V + (1-\beta_2) R^2,\quad
          N = \frac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)} + \epsilon}\\
        &\hat D = \phi \odot (G - \mathrm{back}(R)),\quad \phi = \|N\| / \|R\| \text{ per row (right) or column (left)},\quad
          \hat D \leftarrow \hat D \min\big(1, \gamma \|\hat D_{t-1}\|_F / \|\hat D\|_F\big)\\
        &W \leftarrow W(1 - \eta\lambda) - \eta\,\big(\alpha\,\mathrm{back}(N) + \hat D\big)
        \end{aligned}

    ``back(N)`` is ``N S^T`` (right) or ``S N`` (left); ``alpha`` is ``scale``, ``gamma`` is
    ``norm_growth_limit``. The QR is sign-fixed (positive diagonal of ``R``), which makes it Haar.

    Defaults: ``lr=1e-3``, ``rank=128``, ``update_proj_gap=200`` (T), ``scale=0.25``,
    ``refresh="randomized"``, ``moment_policy="transform"`` (AO), ``recovery_scaling=True``,
    ``norm_growth_limit=1.01``, ``stagger=True``. The paper's values of T and r were not published;
    these are the SubTrack++ reference scripts' (its authors' previous method).

    Where we differ, deliberately (no code of the paper was published; see the project's research
    notes for the reconstruction):
    - AO is applied at the actual switch with the basis held until then. SubTrack++'s reference
      code fires it one step early against the *initial* basis.
    - AO (``moment_policy="transform"``) maps the bias-corrected mean and variance, so it is the
      identity when the subspace does not change, and it gives each new direction the part of the
      second moment the old basis did not see (the mean over the old coordinates). Without that,
      every jump left ``V`` at about ``r/d`` of its scale and the steps after it several times too
      large. It omits the reference code's extra ``(1 - beta2)`` factor.
    - The recovery residual is ``G - back(R)``, orthogonal to the subspace. Fira's code subtracts
      ``alpha back(R)``, which leaves part of the in-subspace gradient in it when ``alpha != 1``.
      As there, ``D_hat`` is not multiplied by ``alpha``; the first step records its norm unlimited.
    - The first basis (step 0) comes from the gradient by ``refresh`` (as SubTrack++ starts from an SVD);
      ``refresh="random"`` makes every basis Haar. Jump seeds are ``(seed, name, refresh index)``, so
      shard groups need no communication to agree, and refreshes are staggered by name.

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's:
    ``step`` (int64) + ``basis`` (d x r) + ``exp_avg``, ``exp_avg_sq`` (r x D) + ``rs_norm`` (0-d),
    all fp32: ``8 + 4 (d r + 2 r D) + 4`` bytes (``8 + 4 (d r + 2 r D)`` with
    ``recovery_scaling=False``); ``8 + 8 m n`` at full rank. The old basis AO needs is transient.
    """

    algorithm = "grassjump"

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
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

    def _data_method(self, group: dict, step: int) -> str | None:
        return group["refresh"] if step == 0 else None

    def _new_basis(self, grad, state, group, view: MatrixShardView, plan, step: int, index: int):
        if method := self._data_method(group, step):
            return self._data_basis(method, grad, state, group, view, plan, step, index)
        return self._haar(group, view, plan, index, grad.device)
