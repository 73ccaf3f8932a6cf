"""The subspace engine shared by every projection-based algorithm.

It owns the per-matrix basis: its shape (from the global shape, the rank and the side), its
refresh schedule, and projection to and from it. How a new basis is found and what happens to the
moments then is the algorithm's (``optim/projected.py`` holds the shared loop). State it keeps,
all tensors: ``basis`` (``d x r``, fp32; row-sharded for a left basis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .moments import MOMENT_POLICIES
from .projector import REFRESH_METHODS, basis_local_shape, project, project_back, resolve_side, side_dim
from .schedule import is_refresh_step, last_refresh_step, refresh_phase
from .shard import MatrixShardView, chunk_rows


@dataclass(frozen=True)
class SubspacePlan:
    """Geometry of one matrix's subspace. ``full`` means the rank covers the whole side, so the
    identity is used as the basis (any basis of the full space spans it) and nothing is projected."""

    side: str
    rank: int
    full: bool
    phase: int
    basis_sharded: bool = False  # a right basis split over the shard group, gathered for each step


def check_subspace_hparams(group: dict) -> None:
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank!r}: the subspace rank must be a positive integer (e.g. rank=128)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"update_proj_gap={gap!r}: must be a positive integer number of steps (e.g. 200)")
    if group["refresh"] not in REFRESH_METHODS:
        raise ValueError(f"refresh={group['refresh']!r} is not one of {REFRESH_METHODS}")
    resolve_side(group["side"], (2, 1))
    if group["moment_policy"] not in MOMENT_POLICIES:
        raise ValueError(f"moment_policy={group['moment_policy']!r} is not one of {MOMENT_POLICIES}")
    for key in ("oversample", "power_iters"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}={value!r}: must be a non-negative integer")


def plan(view: MatrixShardView, group: dict) -> SubspacePlan:
    side = resolve_side(group["side"], view.global_shape)
    dim = side_dim(side, view.global_shape)
    full = group["rank"] >= dim
    rank = min(group["rank"], view.m, view.n)
    basis_sharded = bool(group.get("shard_basis")) and view.sharded and side == "right" and not full
    phase = refresh_phase(view.name, group["update_proj_gap"], group["stagger"])
    return SubspacePlan(side, rank, full, phase, basis_sharded)


def basis_chunk_rows(view: MatrixShardView) -> tuple[int, int]:
    """Rows ``[start, end)`` of an ``n x r`` right basis this rank keeps when the basis is sharded."""
    counts = chunk_rows(view.n, comm.world_size(view.group))
    me = comm.rank(view.group)
    return sum(counts[:me]), sum(counts[: me + 1])


def allocate_basis(state: dict, view: MatrixShardView, plan_: SubspacePlan, device) -> None:
    if plan_.full:
        return
    shape = basis_local_shape(plan_.side, view, plan_.rank)
    if plan_.basis_sharded:
        start, end = basis_chunk_rows(view)
        shape = (end - start, plan_.rank)
    state["basis"] = torch.zeros(shape, dtype=torch.float32, device=device)


def gather_basis(state: dict, view: MatrixShardView) -> torch.Tensor:
    """The whole right basis from its per-rank chunks (one ``n x r`` all-gather)."""
    counts = chunk_rows(view.n, comm.world_size(view.group))
    return comm.all_gather_rows(state["basis"], list(counts), view.group)


def refresh_due(step: int, plan_: SubspacePlan, group: dict) -> bool:
    return not plan_.full and is_refresh_step(step, group["update_proj_gap"], plan_.phase)


def moment_updates(step: int, plan_: SubspacePlan, group: dict) -> int:
    """How many updates the subspace moments hold after the update of step ``step`` (counted from 0):
    since their last reset under ``moment_policy="reset"``, else since the first step. Adam's bias
    corrections ``1 - beta^t`` use this ``t``, so a reset moment is not under-weighted (``M``) or
    over-amplified against a global count (``V``) in the steps after the reset."""
    if plan_.full or group["moment_policy"] != "reset":
        return step + 1
    return step - last_refresh_step(step, group["update_proj_gap"], plan_.phase) + 1


def project_grad(grad: torch.Tensor, state: dict, view: MatrixShardView, plan_: SubspacePlan) -> torch.Tensor:
    return grad if plan_.full else project(grad, state["basis"], plan_.side, view.group)


def back_project(low: torch.Tensor, state: dict, plan_: SubspacePlan) -> torch.Tensor:
    return low if plan_.full else project_back(low, state["basis"], plan_.side)


def projected_shape(view: MatrixShardView, plan_: SubspacePlan) -> tuple[int, int]:
    if plan_.full:
        return (view.local_rows, view.n)
    return (view.local_rows, plan_.rank) if plan_.side == "right" else (plan_.rank, view.n)
