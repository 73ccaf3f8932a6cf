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

Sharding: a rank holds rows ``[row_start, row_end)`` of the global matrix, so it keeps the blocks
that overlap them. Per-row blocks are local. A head block may be split between two ranks; its
partial sums go through one all-reduce of a ``n_blocks`` vector (a few floats) over ``view.group``,
so every holder of a block sees the same value whatever the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .shard import MatrixShardView

HEAD_ROLES = {"q": "n_heads", "k": "n_kv_heads"}


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of ``rows`` consecutive global rows; this rank holds blocks ``[first, first + count)``."""

    rows: int
    n_blocks: int
    first: int
    count: int
    numel: int  # elements per block in the global matrix


def check_head_hparams(n_heads, n_kv_heads) -> None:
    for key, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{key}={value!r}: must be a positive integer or None")
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
    if view.local_rows == 0:
        return BlockPlan(rows, n_blocks, view.row_start // rows, 0, rows * view.n)
    first = view.row_start // rows
    last = (view.row_end - 1) // rows
    return BlockPlan(rows, n_blocks, first, last - first + 1, rows * view.n)


def block_mean_sq(grad: torch.Tensor, view: MatrixShardView, plan: BlockPlan) -> torch.Tensor:
    """Mean of ``grad^2`` over each block this rank holds (global means, shape ``(count,)``)."""
    row_sums = grad.float().square().sum(dim=1)
    if plan.rows == 1:  # whole blocks are local
        return row_sums / plan.numel
    totals = row_sums.new_zeros(plan.n_blocks)
    index = torch.arange(view.row_start, view.row_end, device=grad.device) // plan.rows
    totals.index_add_(0, index, row_sums)
    comm.all_reduce_sum(totals, view.group)  # a head split across ranks sums its parts
    return totals[plan.first : plan.first + plan.count] / plan.numel


def expand_to_rows(values: torch.Tensor, view: MatrixShardView, plan: BlockPlan) -> torch.Tensor:
    """Per-block values broadcast to this rank's rows, shape ``(local_rows, 1)``."""
    if plan.rows == 1:
        return values.unsqueeze(1)
    index = torch.arange(view.row_start, view.row_end, device=values.device) // plan.rows - plan.first
    return values[index].unsqueeze(1)


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
