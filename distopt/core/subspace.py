"""The subspace engine shared by every projection-based algorithm.

It owns the per-matrix basis: its shape (from the global shape, the rank and the side), its
refresh schedule, its layout across ranks, and projection to and from it. How a new basis is
found and what happens to the moments then is the algorithm's (``optim/projected.py`` holds the
shared loop). State it keeps, all tensors: ``basis`` (``d x r``, fp32).

Layouts of a matrix row-sharded over ``N`` ranks (``G`` local: ``m/N x n``), ``state_layout=``:

- ``partitioned`` (the default): every ``d``-long tensor is split over the ranks. A left basis
  ``P`` (``m x r``) is row-sharded like ``G``; its projected tensors (``r x n``) are split by columns:
  ``P^T G`` is reduce-scattered, each rank updates its ``n/N`` columns, and the direction is
  all-gathered for ``P N``: the bandwidth of the all-reduce it replaces. A right basis ``Q``
  (``n x r``) keeps ``n/N`` rows per rank and is all-gathered for each step (``n r`` floats, one
  gathered basis alive at a time); its projected tensors (``m x r``) are row-sharded like ``G``.
- ``replicated``: ``Q`` and the left side's ``r x n`` tensors whole on every rank; no traffic for
  ``Q``, memory that does not fall with ``N``.

Either way the numbers are those of one process (to float tolerance): only where sums happen moves.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import comm
from .moments import MOMENT_POLICIES
from .options import check_option
from .projector import REFRESH_METHODS, project_back, project_local, resolve_side, side_dim
from .schedule import is_refresh_step, last_refresh_step, refresh_phase
from .shard import MatrixShardView

STATE_LAYOUTS = ("partitioned", "replicated")


@dataclass(frozen=True)
class SubspacePlan:
    """Geometry of one matrix's subspace. ``full`` means the rank covers the whole side, so the
    identity is used as the basis (any basis of the full space spans it) and nothing is projected."""

    side: str
    rank: int
    full: bool
    phase: int
    # Split over the shard group: a right basis's rows, a left side's projected columns (see above).
    partitioned: bool = False

    @property
    def basis_chunked(self) -> bool:
        """A right basis kept as ``n/N``-row chunks and gathered for each step."""
        return self.partitioned and self.side == "right"

    @property
    def columns_chunked(self) -> bool:
        """Left-side projected tensors (``r x n``) kept as ``n/N``-column chunks."""
        return self.partitioned and self.side == "left"


def check_subspace_hparams(group: dict) -> None:
    check_option(group, "rank", "int", low=1, note="the subspace rank, e.g. rank=128")
    check_option(group, "update_proj_gap", "int", low=1, note="steps between refreshes, e.g. 200")
    check_option(group, "refresh", "choice", choices=REFRESH_METHODS)
    resolve_side(group["side"], (2, 1))
    check_option(group, "moment_policy", "choice", choices=MOMENT_POLICIES)
    for key in ("oversample", "power_iters"):
        check_option(group, key, "int", low=0)
    check_state_layout(group)


def check_state_layout(group: dict) -> None:
    if "state_layout" in group:
        check_option(group, "state_layout", "choice", choices=STATE_LAYOUTS)


def is_partitioned(view: MatrixShardView, group: dict) -> bool:
    """Whether this matrix's subspace state is split over its shard group (see the module docstring)."""
    return view.parts > 1 and group.get("state_layout", "partitioned") == "partitioned"


def make_plan(view: MatrixShardView, group: dict, side: str, rank: int, full: bool) -> SubspacePlan:
    """The plan of a matrix whose side and rank the algorithm has chosen."""
    phase = refresh_phase(view.name, group["update_proj_gap"], group["stagger"])
    return SubspacePlan(side, rank, full, phase, not full and is_partitioned(view, group))


_PLANS: dict[tuple, tuple[MatrixShardView, SubspacePlan]] = {}


def plan(view: MatrixShardView, group: dict) -> SubspacePlan:
    # Asked for every matrix on every step: cached by the view's identity and the settings it reads.
    key = (id(view), group["side"], group["rank"], group["update_proj_gap"], group["stagger"],
           group.get("state_layout", "partitioned"))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is view:
        return hit[1]
    side = resolve_side(group["side"], view.global_shape)
    full = group["rank"] >= side_dim(side, view.global_shape)
    made = make_plan(view, group, side, min(group["rank"], view.m, view.n), full)
    if len(_PLANS) > 1 << 16:  # views of finished optimizers
        _PLANS.clear()
    _PLANS[key] = (view, made)
    return made


def basis_local_shape(view: MatrixShardView, plan_: SubspacePlan) -> tuple[int, int]:
    if plan_.side == "left":
        return (view.local_rows, plan_.rank)
    if plan_.basis_chunked:
        start, end = view.chunk(view.n)
        return (end - start, plan_.rank)
    return (view.n, plan_.rank)


# How a basis is stored between steps. The step itself always works on an fp32 copy.
BASIS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def basis_dtype(group: dict) -> torch.dtype:
    return BASIS_DTYPES[group.get("basis_dtype", "fp32")]


def allocate_basis(state: dict, view: MatrixShardView, plan_: SubspacePlan, device, dtype=torch.float32) -> None:
    if not plan_.full:
        state["basis"] = torch.zeros(basis_local_shape(view, plan_), dtype=dtype, device=device)


def distributed_state(view: MatrixShardView, plan_: SubspacePlan, keys: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{key: (global shape, dim)}`` of the state split in ``torch.chunk`` pieces over the shard
    group along ``dim`` (not by the matrix's rows): a chunked right basis, and the left side's
    column-chunked projected tensors named in ``keys``."""
    if plan_.basis_chunked:
        return {"basis": ((view.n, plan_.rank), 0)}
    if plan_.columns_chunked:
        return {key: ((plan_.rank, view.n), 1) for key in keys}
    return {}


def gathered_basis(state: dict, view: MatrixShardView, plan_: SubspacePlan) -> torch.Tensor:
    """The whole basis: a chunked right basis all-gathered (``n x r``), else ``state["basis"]``."""
    if not plan_.basis_chunked:
        return state["basis"]
    return comm.all_gather_rows(state["basis"], view.chunk_counts(view.n), view.group)


@contextmanager
def whole_basis(state: dict, view: MatrixShardView, plan_: SubspacePlan):
    """``state`` with the whole fp32 basis for one step: a chunked right basis is all-gathered
    (``n x r``, in its stored dtype: a bf16 basis halves the traffic), a bf16 one is converted, and
    on exit this rank's rows of it (changed by a refresh) are stored back; fp32 unchunked bases as
    they are."""
    stored = state.get("basis")
    if stored is None or (not plan_.basis_chunked and stored.dtype == torch.float32):
        yield state
        return
    work = {**state, "basis": gathered_basis(state, view, plan_).float()}
    yield work
    stored.copy_(work["basis"][slice(*view.chunk(view.n))] if plan_.basis_chunked else work["basis"])


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


def project_grad(grad: torch.Tensor, state: dict, view: MatrixShardView, plan_: SubspacePlan,
                 average: bool = True) -> torch.Tensor:
    """This rank's part of ``proj(G)``: ``G Q`` (local rows), or ``P^T G`` summed over the row
    shards (its column chunk when partitioned), averaged over the view's replicas when they sync by
    projection (unless ``average`` is False). ``state`` holds the whole basis (:func:`whole_basis`)."""
    if plan_.full:
        return comm.replica_mean(grad.clone(), view.replicas) if view.replicas is not None and average else grad
    low = project_local(grad, state["basis"], plan_.side)
    if plan_.side == "left" and plan_.columns_chunked:
        low = comm.reduce_scatter_cols(low, view.chunk_counts(view.n), view.group)
    elif plan_.side == "left":
        low = comm.all_reduce_sum(low, view.group)
    # Projected sync: proj(mean G) = mean proj(G). ``average=False`` leaves it to the caller (coalesced).
    return comm.replica_mean(low, view.replicas) if average else low


def gather_projected(low: torch.Tensor, view: MatrixShardView, plan_: SubspacePlan) -> torch.Tensor:
    """A projected tensor whole along ``n`` (``r x n`` for a left basis): column chunks gathered."""
    return comm.all_gather_cols(low, view.chunk_counts(view.n), view.group) if plan_.columns_chunked else low


def back_project(low: torch.Tensor, state: dict, view: MatrixShardView, plan_: SubspacePlan) -> torch.Tensor:
    """``back(low)`` for this rank's rows: ``low Q^T``, or ``P low`` (column chunks gathered first)."""
    if plan_.full:
        return low
    return project_back(gather_projected(low, view, plan_), state["basis"], plan_.side)


def projected_shape(view: MatrixShardView, plan_: SubspacePlan) -> tuple[int, int]:
    if plan_.full:
        return (view.local_rows, view.n)
    if plan_.side == "right":
        return (view.local_rows, plan_.rank)
    if plan_.columns_chunked:
        start, end = view.chunk(view.n)
        return (plan_.rank, end - start)
    return (plan_.rank, view.n)
