"""Adam-mini's partition of a matrix into blocks that share one second moment.

Each matrix is cut into blocks of whole rows; every block keeps one value, the EMA of the MEAN of
``g^2`` over the block (Adam-mini v1.1 rules, decided by the parameter's role):

- ``q``: one block per attention head, ``m / n_heads`` rows each;
- ``k``: one block per key/value head, ``m / n_kv_heads`` rows each (grouped-query attention);
- ``v``, ``o``, ``mlp_in``, ``mlp_out``: one block per output neuron (row);
- ``embedding``, ``lm_head``: one block per token (row);
- ``qkv``, ``matrix``: one block per row. Fused QKV weights are laid out differently by each model
  family (row blocks q|k|v, head-interleaved, or the transposed GPT-2 ``Conv1D``), so no head split
  is attempted; a row is never coarser than a head, so this errs towards Adam.

Sharding: a rank holds rows ``[row_start, row_end)`` of the global matrix. Per-row values are
row-sharded like the matrix and need no communication. Head values are replicated: a head may be
split between two ranks, so every rank adds its rows' partial sums into an ``n_blocks`` vector
(a few floats) that one all-reduce over ``view.group`` completes; every rank then holds all
``n_blocks`` values, identical whatever the number of ranks, and the state's shape does not depend
on the sharding (checkpoints reshard freely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from . import comm
from .options import check_option
from .shard import MatrixShardView

if TYPE_CHECKING:
    from ..optim.base import SubspaceOptimizer

    _OptimizerMixin = SubspaceOptimizer  # what the mixin is combined with
else:
    _OptimizerMixin = object

HEAD_ROLES = {"q": "n_heads", "k": "n_kv_heads"}


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of ``rows`` consecutive global rows. This rank keeps ``count`` values: its own rows'
    (``rows == 1``, row-sharded) or all ``n_blocks`` heads (``rows > 1``, replicated)."""

    rows: int
    n_blocks: int
    count: int
    numel: int  # elements per block in the global matrix


def check_head_hparams(n_heads, n_kv_heads) -> None:
    heads = {"n_heads": n_heads, "n_kv_heads": n_kv_heads}
    for key in heads:
        check_option(heads, key, "int", low=1, optional="to read it from the model")
    if n_heads is not None and n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads!r}: must divide n_heads={n_heads!r}")


def heads_for_role(role: str, n_heads, n_kv_heads) -> int | None:
    """Number of head blocks of a ``q``/``k`` matrix; ``None`` for the per-row roles."""
    if role == "q":
        return n_heads
    if role == "k":
        return n_kv_heads if n_kv_heads is not None else n_heads
    return None


def rows_per_block(name: str, role: str, global_shape: tuple[int, int], n_heads, n_kv_heads, algorithm: str) -> int:
    """Rows per block for a matrix of this role and global shape; raises with the fix if unknown."""
    if role not in HEAD_ROLES:
        return 1
    heads = heads_for_role(role, n_heads, n_kv_heads)
    if heads is None:
        raise ValueError(
            f"{algorithm}: {name!r} has role {role!r} and is split into one block per attention head, but the "
            "number of heads is unknown (the model has no config.num_attention_heads and no "
            "shape.num_attention_heads). Fix: pass n_heads=... (and n_kv_heads=... for grouped-query "
            "attention) to build_optimizer, or give it per-row blocks with rules=[(pattern, 'matrix')]."
        )
    m = global_shape[0]
    if m % heads:
        what = "n_heads" if role == "q" else "n_kv_heads"
        raise ValueError(
            f"{algorithm}: {name!r} (role {role!r}) has {m} rows, not divisible into {heads} head blocks; "
            f"check {what}={heads}"
        )
    return m // heads


def block_plan(view: MatrixShardView, rows: int) -> BlockPlan:
    n_blocks = view.m // rows
    return BlockPlan(rows, n_blocks, view.local_rows if rows == 1 else n_blocks, rows * view.n)


def block_mean_sq(grad: torch.Tensor, view: MatrixShardView, plan: BlockPlan) -> torch.Tensor:
    """Mean of ``grad^2`` over each block this rank keeps (global means, shape ``(count,)``). A
    leading batch dimension (same-shape matrices of one process, ``view`` any of theirs) gives
    ``(batch, count)``, each row as the matrix alone would get it."""
    row_sums = grad.float().square().sum(dim=-1)
    if plan.rows == 1:  # one row per block: local
        return row_sums / plan.numel
    totals = row_sums.new_zeros((*row_sums.shape[:-1], plan.n_blocks))
    index = torch.arange(view.row_start, cast(int, view.row_end), device=grad.device) // plan.rows  # row_end: set by the view
    totals.index_add_(-1, index, row_sums)
    comm.all_reduce_sum(totals, view.group)  # a head split across ranks sums its parts
    return totals / plan.numel


def expand_to_rows(values: torch.Tensor, view: MatrixShardView, plan: BlockPlan) -> torch.Tensor:
    """Per-block values broadcast to this rank's rows, shape ``(local_rows, 1)``; a leading batch
    dimension (``(batch, count)``, as :func:`block_mean_sq` gives) gives ``(batch, local_rows, 1)``."""
    if plan.rows == 1:
        return values.unsqueeze(-1)
    index = torch.arange(view.row_start, cast(int, view.row_end), device=values.device) // plan.rows
    return values[..., index].unsqueeze(-1)


def model_head_counts(model: torch.nn.Module) -> tuple[int | None, int | None]:
    """``(num_attention_heads, num_key_value_heads)`` from a Hugging Face ``config`` or a
    :class:`distopt.models.TinyLlama` ``shape``; ``(None, None)`` when the model exposes neither."""
    for owner in (model, getattr(model, "module", None)):
        if owner is None:
            continue
        for source in (getattr(owner, "config", None), getattr(owner, "shape", None)):
            heads = getattr(source, "num_attention_heads", None)
            if isinstance(heads, int) and not isinstance(heads, bool):
                kv = getattr(source, "num_key_value_heads", None)
                return heads, kv if isinstance(kv, int) and not isinstance(kv, bool) else heads
    return None, None


def resolve_head_hparams(model: torch.nn.Module, hparams: dict) -> dict:
    """Fill ``n_heads``/``n_kv_heads`` from the model where the caller did not pass them."""
    heads, kv = model_head_counts(model)
    if hparams.get("n_heads") is None and heads is not None:
        hparams["n_heads"] = heads
        if hparams.get("n_kv_heads") is None:
            hparams["n_kv_heads"] = kv
    return hparams


class BlockSecondMoment(_OptimizerMixin):
    """Mixin for optimizers with Adam-mini block second moments (``adam-mini``, ``adapm-mini``).

    Supplies head counts from the model, checks every matrix's blocks when its group is added
    (so a missing head count fails at construction, with the fix), and keeps the block second
    moment in ``state["exp_avg_sq"]`` (shape ``(B,)``: this rank's rows, or all heads). The optimizer's
    param groups carry ``n_heads``, ``n_kv_heads`` and ``betas``.
    """

    @classmethod
    def prepare_model(cls, model: torch.nn.Module, hparams: dict) -> dict:
        return resolve_head_hparams(model, hparams)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kind"] == "matrix":
            check_head_hparams(group["n_heads"], group["n_kv_heads"])
            for p in group["params"]:
                self.block_plan(group, self._views[p])

    def block_plan(self, group: dict, view: MatrixShardView) -> BlockPlan:
        rows = rows_per_block(view.name, self.role_by_name(view.name), view.global_shape,
                              group["n_heads"], group["n_kv_heads"], self.algorithm)
        return block_plan(view, rows)

    def _init_second_moment(self, p: torch.Tensor, state: dict, group: dict, view: MatrixShardView) -> None:
        plan = self.block_plan(group, view)
        state["exp_avg_sq"] = torch.zeros((plan.count,), dtype=torch.float32, device=p.device)

    def _update_second_moment(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                              view: MatrixShardView) -> torch.Tensor:
        """EMA of the block means of ``grad^2``; returns it broadcast to the local rows, ``(rows, 1)``."""
        plan = self.block_plan(group, view)
        beta2 = group["betas"][1]
        state["exp_avg_sq"].mul_(beta2).add_(block_mean_sq(grad, view, plan), alpha=1.0 - beta2)
        return expand_to_rows(state["exp_avg_sq"], view, plan)

    def _second_moment_key(self, group: dict, view: MatrixShardView) -> tuple:
        """Matrices batched together share their blocks (and rows: whole matrices of one process)."""
        plan = self.block_plan(group, view)
        return plan.rows, plan.count, view.row_start

    def _update_second_moments(self, grads: torch.Tensor, packing, group: dict, view: MatrixShardView) -> torch.Tensor:
        """:meth:`_update_second_moment` of a batch from its stacked gradients ``(batch, rows, n)`` and
        packed state (``view``: any member's); returns ``(batch, rows, 1)``."""
        plan = self.block_plan(group, view)
        beta2 = group["betas"][1]
        second, copied = packing.get("exp_avg_sq")
        second.mul_(beta2).add_(block_mean_sq(grads, view, plan), alpha=1.0 - beta2)
        if copied:
            packing.store_back("exp_avg_sq", second)
        return expand_to_rows(second, view, plan)
