"""Adam-mini: one second moment per Hessian block (Zhang et al., ICLR 2025)."""

from __future__ import annotations

import math

import torch

from ..core import batching, blocks
from ..core.routing import LINEAR_ROLES
from ..core.shard import MatrixShardView, local
from .base import SubspaceOptimizer, apply_update


class AdamMini(blocks.BlockSecondMoment, SubspaceOptimizer):
    r"""Adam with one second moment per block of whole rows (Adam-mini v1.1 partition).

    For each matrix ``W`` (global ``m x n``) with gradient ``G``, cut into blocks ``b`` of whole
    rows (:mod:`distopt.core.blocks`), and step ``t``:

    .. math::
        \begin{aligned}
        &M \leftarrow \beta_1 M + (1-\beta_1) G, \qquad
         v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{(i,j)\in b}\, G_{ij}^2\\
        &W \leftarrow W(1 - \eta\lambda) - \eta\,\frac{M/(1-\beta_1^t)}{\sqrt{v_b/(1-\beta_2^t)} + \epsilon}
        \end{aligned}

    Blocks: one per attention head for ``q`` (``n_heads`` blocks of ``m / n_heads`` rows) and ``k``
    (``n_kv_heads`` blocks, grouped-query attention); one per output neuron (row) for ``v``, ``o``,
    ``mlp_in``, ``mlp_out``; one per token (row) for ``embedding`` and ``lm_head``; one per row for
    fused ``qkv`` and other linears. Norms and biases use element-wise AdamW. Head counts come from
    the model (``config.num_attention_heads``/``num_key_value_heads`` of a Hugging Face model, or
    ``shape`` of :class:`distopt.models.TinyLlama`) through :meth:`prepare_model`, or from
    ``n_heads``/``n_kv_heads``, which win; a ``q``/``k`` matrix without them raises, naming the fix.

    Defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``,
    ``adam_form="torch"`` (the ``adam_mini`` package's form: decay before the step, ``eps`` on the
    bias-corrected RMS). ``adam_form="hf"`` puts ``eps`` on the raw RMS and decays after the step.

    Where we differ from the reference package (``adam-mini`` 1.1.1), and why:
    - Roles come from distopt's routing (name rules checked for typos, or explicit ``rules``), not
      from substring sets such as ``"mlp"``/``"linear"``/``"embed"``.
    - Norm weights (and any parameter not routed to a matrix role) get element-wise AdamW; the
      package gives them one ``v`` for the whole tensor. Biases are element-wise in both.
    - Fused ``qkv`` and unrecognised linears get one ``v`` per row: fused layouts differ between
      model families (the package gives GPT-2's ``c_attn`` one ``v`` for the whole tensor).
    - Weight decay of the element-wise group applies to norms too unless
      ``elementwise={"weight_decay": 0}`` is passed (the package skips names with norm/ln/bias).
    - The head split works on row shards that cut a head in two (one all-reduce of a
      ``n_heads``-vector); the package needs whole heads per rank.

    In one process, matrices of one shape and block size step together (moments packed per batch,
    one kernel per operation for all of them); row-sharded matrices, the ``hf`` form and bf16
    weights step one by one (a sharded head block needs its all-reduce per matrix).

    State per matrix, with ``B`` its number of blocks (``n_heads`` for q, ``n_kv_heads`` for k,
    ``m`` otherwise): ``step`` (int64) + ``exp_avg`` (m x n) + ``exp_avg_sq`` (B), fp32:
    ``8 + 4 (m n + B)`` bytes. Element-wise AdamW parameters of ``N`` elements: ``4 + 8 N``.
    Row-sharded, ``m`` is this rank's row count; head values are replicated (all ``n_heads``).
    """

    algorithm = "adam-mini"
    matrix_roles = LINEAR_ROLES | {"embedding", "lm_head"}
    shape_hparams = ("n_heads", "n_kv_heads")

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        adam_form: str = "torch",
    ):
        blocks.check_head_hparams(n_heads, n_kv_heads)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, n_heads=n_heads,
                        n_kv_heads=n_kv_heads, adam_form=adam_form)
        super().__init__(params, defaults)

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        state["exp_avg"] = torch.zeros((view.local_rows, view.n), dtype=torch.float32, device=p.device)
        self._init_second_moment(p, state, group, view)

    def _matrix_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        beta1, beta2 = group["betas"]
        grad = grad.float()
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        rms = self._update_second_moment(p, grad, state, group, view).sqrt()
        state["step"] += 1
        step = int(state["step"])
        c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
        if group["adam_form"] == "hf":
            denom, step_size = rms + group["eps"], float(group["lr"]) * math.sqrt(c2) / c1
        else:
            denom, step_size = rms / math.sqrt(c2) + group["eps"], float(group["lr"]) / c1
        lr = float(group["lr"])
        apply_update(p, exp_avg / denom, step_size, lr, group["weight_decay"], group["adam_form"])

    # -- matrices of one shape and block size, stepped together (one process) -----------------------
    def _step_matrices(self, group: dict, params: list[torch.Tensor]) -> None:
        def batch_key(p):
            view = self._views[p]
            if group["adam_form"] == "torch" and p.dtype == torch.float32 and not view.sharded:
                return tuple(p.shape), self.block_plan(group, view).rows
            return None

        # The stacked gradients, their squares and the directions: three full-size copies at once.
        self._step_by_batches(group, params, batch_key, 3, lambda g, members, key: self._step_batch(g, members, key[1]))

    def _step_batch(self, group: dict, params: list[torch.Tensor], rows: int) -> None:
        """:meth:`_matrix_step` of same-shape matrices (``torch`` form, fp32, one process) with one
        kernel per operation for all of them: the moments are packed in one buffer per state tensor
        (``core.batching``), the block means are a reshape and a sum, and the weights take two
        ``torch._foreach_*`` calls. The block second moments are the per-matrix step's bit for bit
        (the shared block code); the weights up to the rounding of the scaled update."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        packing = batching.PackedState([self.state[p] for p in params])
        avg, avg_copied = packing.get("exp_avg")
        avg_sq, avg_sq_copied = packing.get("exp_avg_sq")
        steps, steps_copied = packing.get("step")
        grads = torch.stack([local(p.grad) for p in params]).float()
        k, m, n = grads.shape
        avg.lerp_(grads, 1.0 - beta1)
        view = self._views[params[0]]
        means = blocks.block_mean_sq(grads, view, self.block_plan(group, view))  # (k, blocks)
        del grads
        avg_sq.mul_(beta2).add_(means, alpha=1.0 - beta2)
        steps.add_(1)
        counts = [int(c) for c in steps.tolist()]
        denom = avg_sq.sqrt().div_(batching.per_matrix([math.sqrt(1.0 - beta2**c) for c in counts], avg_sq, 2)).add_(eps)
        sizes = batching.per_matrix([-lr / (1.0 - beta1**c) for c in counts], avg, 3)
        direction = (avg.view(k, m // rows, rows, n) / denom.view(k, m // rows, 1, 1)).view(k, m, n).mul_(sizes)
        weights = [local(p) for p in params]
        if wd:
            torch._foreach_mul_(weights, 1.0 - lr * wd)
        torch._foreach_add_(weights, direction.unbind(0))
        for key, value, copied in (("exp_avg", avg, avg_copied), ("exp_avg_sq", avg_sq, avg_sq_copied),
                                   ("step", steps, steps_copied)):
            if copied:
                packing.store_back(key, value)
