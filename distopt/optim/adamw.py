"""Plain AdamW through distopt's routing and name-keyed checkpoints: the baseline."""

from __future__ import annotations

from .base import SubspaceOptimizer


class AdamW(SubspaceOptimizer):
    r"""Element-wise AdamW on every parameter (torch.optim.AdamW's update and numbers).

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) G,\quad V \leftarrow \beta_2 V + (1-\beta_2) G^2,\quad
        W \leftarrow W(1-\eta\lambda) - \eta \frac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)}+\epsilon}

    State per parameter of ``N`` elements: ``4`` (fp32 step) ``+ 8 N`` bytes.
    """

    algorithm = "adamw"
    matrix_roles = frozenset()

    def __init__(self, params, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adam_form: str = "torch"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_form=adam_form)
        super().__init__(params, defaults)
