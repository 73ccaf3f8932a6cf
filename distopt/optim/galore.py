"""GaLore: Adam on gradients projected to a rank-r subspace (Zhao et al., 2024)."""

from __future__ import annotations

from typing import cast

from ..core.shard import MatrixShardView
from .base import hyperparameters
from .projected import ProjectedAdam


class GaLore(ProjectedAdam):
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

    Defaults: the paper's C4 pre-training settings (60M-1B): ``lr=1e-2``, ``scale=0.25``,
    ``update_proj_gap=200``, ``rank=128`` (the 60M model's; 256 at 130M-350M, 512 at 1B), and
    galore-torch's ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0``.

    Where we differ from the paper's code (galore-torch):
    - ``refresh="randomized"`` (warm-started range finder, ``power_iters`` passes) and
      ``stagger=True`` (refresh phase from a hash of the name): no step refreshes every matrix, and a
      refresh costs O(mnk) instead of a full SVD. ``refresh="svd", stagger=False`` is the paper's rule.
    - State and basis are fp32 and the basis holds exactly ``d x r`` (no view of a full ``U``/``V``).
    - ``adam_form="torch"`` puts ``eps`` where torch.optim.AdamW does; ``"hf"`` is galore-torch's
      form (``eps`` on the raw RMS, decay after the step) and reproduces it step for step.
    - ``rank >= d`` (the projected side's length) means the subspace is the whole space: the basis is
      the identity, ``scale`` is not applied (nothing is projected away to compensate for) and the
      step is AdamW's exactly. galore-torch applies ``scale`` at full rank too.
    - ``moment_policy`` (``keep`` in the paper) can also be ``reset``, ``rotate`` or ``transform``.
    - ``recovery_scaling=True`` adds Fira's norm-scaled residual (off by default, as in the paper).

    State per matrix, with ``d`` the projected side's length and ``D`` the other side's:
    ``step`` (int64) + ``basis`` (d x r) + ``exp_avg``, ``exp_avg_sq`` (r x D), all fp32:
    ``8 + 4 (d r + 2 r D)`` bytes, plus 4 with ``recovery_scaling``; ``8 + 8 m n`` at full rank.
    """

    algorithm = "galore"

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-2,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        refresh: str = "randomized",
        stagger: bool = True,
        side: str = "auto",
        moment_policy: str = "keep",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        oversample: int = 16,
        power_iters: int = 1,
        adam_form: str = "torch",
        projection_precision: str = "fp32",
        compile: bool = False,
        recovery_scaling: bool = False,
        norm_growth_limit: float = 1.01,
        state_layout: str = "partitioned",
        basis_dtype: str = "fp32",
        seed: int = 0,
    ):
        super().__init__(params, hyperparameters(locals()))

    def _new_basis(self, grad, state, group, view: MatrixShardView, plan, step: int, index: int):
        method = cast(str, self._data_method(group, step))  # ProjectedAdam's: the group's refresh, never None
        return self._data_basis(method, grad, state, group, view, plan, step, index)
