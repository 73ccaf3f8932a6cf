"""AdaPM-mini: AdaPM's partial momentum with Adam-mini's block-wise second moment."""

from __future__ import annotations

from ..core import blocks
from .adapm import AdaPM
from .base import hyperparameters


class AdaPMMini(blocks.BlockSecondMoment, AdaPM):
    r"""AdaPM (see :class:`distopt.optim.adapm.AdaPM`) with one second moment per Adam-mini block.

    Everything is AdaPM's (momentum design per role, low-rank fit and correction, clip, bias
    correction), except the element-wise ``V`` becomes Adam-mini's block value
    (:mod:`distopt.core.blocks`): for each block ``b`` of whole rows,

    .. math::
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{(i,j)\in b}\, G_{ij}^2, \qquad
        W \leftarrow W(1-\eta\lambda) - \eta\,\mathrm{clip}\Big(\frac{\hat M}{\sqrt{v_b/c_2}+\epsilon}, -\kappa, \kappa\Big)

    with one block per head for ``q`` (``n_heads``) and ``k`` (``n_kv_heads``), and one per row
    (output neuron or token) for ``v``, ``o``, MLP, ``embedding``, ``lm_head``, ``qkv`` and other
    linears. Head counts come from the model (``config.num_attention_heads`` /
    ``num_key_value_heads``, or a TinyLlama ``shape``) through :meth:`prepare_model`, or from
    ``n_heads``/``n_kv_heads``; a ``q``/``k`` matrix without them is an error that names the fix.

    Defaults: AdaPM's, plus ``n_heads=None``, ``n_kv_heads=None`` (read from the model).

    Where we differ from the paper: its AdaPM-mini algorithm is not given ("maybe show algorithm in
    appendix"). This is the reconstruction that matches its memory table: Adam-mini's block ``v``
    in place of AdaPM's, the momentum rules unchanged, ``g / (sqrt(v_b) + eps)`` for the
    no-momentum blocks. The embedding keeps Adam-mini's per-token ``v`` (the paper's table
    counts it as zero). Norms and biases are element-wise AdamW, as in AdaPM.

    State per matrix in bytes, with ``B`` its number of blocks (``n_heads`` for q, ``n_kv_heads``
    for k, ``m`` otherwise; row-sharded, ``m`` is this rank's rows and heads stay replicated):
    low rank (q, k, MLP) ``8 + 4 (r (m + n) + B)``; full (v, lm_head, qkv, other)
    ``8 + 4 (m n + B)``; none (embedding, o) ``8 + 4 B``. Element-wise AdamW: ``4 + 8 N``.
    """

    algorithm = "adapm-mini"
    shape_hparams = ("rank", "rank_fraction", "n_heads", "n_kv_heads")

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        rank_fraction: float = 0.05,
        rank: int | None = None,
        update_proj_gap: int = 100,
        fit_sweeps: int = 1,
        correction: str = "derived",
        clip: float | None = 1.0,
        bias_correction: bool = True,
        stagger: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        oversample: int = 8,
        power_iters: int = 1,
        adam_form: str = "torch",
        seed: int = 0,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        state_layout: str = "partitioned",
    ):
        blocks.check_head_hparams(n_heads, n_kv_heads)
        # AdaPM's constructor only packs its keywords into the defaults; these are a superset.
        super(AdaPM, self).__init__(params, hyperparameters(locals()))
