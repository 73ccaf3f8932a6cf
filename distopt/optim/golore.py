"""GoLore: Adam in a random (Haar) rank-r subspace, refreshed every T steps (He et al., ICML 2025)."""

from __future__ import annotations

from ..core.options import check_option
from ..core.shard import MatrixShardView
from .base import hyperparameters
from .projected import ProjectedAdam


class GoLore(ProjectedAdam):
    r"""GoLore: GaLore's update in a basis drawn uniformly from the Stiefel manifold, independently
    of the data, with the first moment rotated into each new basis.

    For each matrix ``W`` (global ``m x n``) with gradient ``G`` and orthonormal basis ``S`` (``d x r``)
    on the shorter side (``right``: ``R = G S``; ``left``: ``R = S^T G``):

    .. math::
        \begin{aligned}
        &\text{on refresh steps: } S' \sim \mathrm{Haar}(\mathrm{St}(d, r)),\quad C = S'^\top S,\quad
          M \leftarrow C M \ (\text{left}) \text{ or } M C^\top \ (\text{right}),\quad S \leftarrow S'\\
        &M \leftarrow \beta_1 M + (1-\beta_1) R, \quad V \leftarrow \beta_2 V + (1-\beta_2) R^2\\
        &W \leftarrow W(1 - \eta\lambda) - \eta\,\alpha\,\mathrm{back}\Big(\frac{M/(1-\beta_1^t)}
          {\sqrt{V/(1-\beta_2^t)} + \epsilon}\Big)
        \end{aligned}

    ``back(N)`` is ``N S^T`` (right) or ``S N`` (left); ``alpha`` is ``scale``. Since
    ``E[S S^T] = (r/d) I``, the projected gradient is unbiased up to scale, which is what lets GoLore
    converge with small-batch noise where GaLore's top singular subspace can miss the true gradient.

    Defaults: ``lr=1e-3``, ``rank=128``, ``update_proj_gap=200`` (T), ``scale=0.25``,
    ``moment_policy="rotate"``, ``galore_steps=0``, ``stagger=True``, ``recovery_scaling=False``.

    Where we differ from the reference code (``pkumelon/Golore``), deliberately:
    - The rotated first moment is written into the state. The reference binds the rotated moment to
      a local variable, so its state keeps the unrotated tensor and the rotation is lost.
    - The Haar basis is a sign-fixed QR of a seeded Gaussian (the reference takes the polar factor
      ``Z (Z^T Z)^{-1/2}``; both are Haar-distributed). Its seed is ``(seed, name, refresh index)``,
      so every rank of a shard group draws the same basis with no communication.
    - Refreshes are staggered by a hash of the parameter name (``stagger=False``: steps 0, T, 2T).
    - The reference runs GaLore for the first ``rand_ratio`` of training; ``galore_steps`` does the
      same here (refreshes before that step use the data-driven ``refresh`` method, the moments
      are still rotated), and defaults to 0, i.e. the method of the paper's analysis.
    - ``moment_policy`` may also be ``keep``, ``reset`` or ``transform``; ``recovery_scaling=True``
      adds Fira's scaled residual (see ``core.recovery``), which the paper does not use.

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's:
    ``step`` (int64) + ``basis`` (d x r) + ``exp_avg``, ``exp_avg_sq`` (r x D), all fp32:
    ``8 + 4 (d r + 2 r D)`` bytes, plus 4 with ``recovery_scaling``; ``8 + 8 m n`` at full rank.
    """

    algorithm = "golore"

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        galore_steps: int = 0,
        refresh: str = "randomized",
        stagger: bool = True,
        side: str = "auto",
        moment_policy: str = "rotate",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        recovery_scaling: bool = False,
        norm_growth_limit: float = 1.01,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        projection_precision: str = "fp32",
        compile: bool = False,
        state_layout: str = "partitioned",
        basis_dtype: str = "fp32",
        seed: int = 0,
    ):
        super().__init__(params, hyperparameters(locals()))

    def _check_algorithm_hparams(self, group: dict) -> None:
        check_option(group, "galore_steps", "int", low=0, note="a number of steps")

    def _data_method(self, group: dict, step: int) -> str | None:
        return group["refresh"] if step < group["galore_steps"] else None

    def _new_basis(self, grad, state, group, view: MatrixShardView, plan, step: int, index: int):
        if method := self._data_method(group, step):
            return self._data_basis(method, grad, state, group, view, plan, step, index)
        return self._haar(group, view, plan, index, grad.device)
