"""Basis refresh for algorithms that keep only a first moment in the subspace (SAM, AdamSNSM).

The new basis comes from the shared refresh of :class:`~distopt.optim.projected.ProjectedAdam`
(``svd``, ``randomized`` or ``random`` by ``group["refresh"]``, seeded by
``(seed, name, refresh index)``). Only ``exp_avg`` lives in the subspace, so only it is mapped:
``keep`` leaves its coordinates, ``reset`` zeroes it, ``rotate`` maps it with ``C = B_new^T B_old``.
A second moment outside the subspace (SAM's full ``V``, SN's subset norms) is never touched.
"""

from __future__ import annotations

import torch

from ..core import batching, subspace
from ..core.moments import apply_moment_policy
from ..core.projector import change_of_basis
from ..core.schedule import refresh_index
from ..core.shard import MatrixShardView, local
from .projected import ProjectedAdam

POLICIES = ("keep", "reset", "rotate")


def refresh_request(plan, state: dict, group: dict, view: MatrixShardView, grad: torch.Tensor):
    """Inputs of this step's data-driven refresh, else ``None`` (see ``_refresh_request``)."""
    step = int(state["step"])
    if plan.full or not subspace.refresh_due(step, plan, group):
        return None
    index = refresh_index(step, group["update_proj_gap"], plan.phase)
    method = group["refresh"]
    return ProjectedAdam._data_request(method, grad, ProjectedAdam._whole_previous(method, state, view, plan, step),
                                       group, view, plan, step, index)


def refresh(grad: torch.Tensor, state: dict, group: dict, view: MatrixShardView, plan, step: int) -> None:
    """Install the basis of this refresh step in ``state["basis"]`` and map ``state["exp_avg"]``."""
    index = refresh_index(step, group["update_proj_gap"], plan.phase)
    new = ProjectedAdam._data_basis(group["refresh"], grad, state, group, view, plan, step, index)
    policy = group["moment_policy"]
    if step > 0 and policy != "keep":
        c = change_of_basis(new, state["basis"], plan.side, view.group) if policy == "rotate" else None
        apply_moment_policy(policy, plan.side, c, state["exp_avg"], None)
    state["basis"].copy_(new)


def refresh_batch(params: list[torch.Tensor], states: list[dict], views: list[MatrixShardView], plans: list,
                  group: dict) -> tuple[batching.PackedState, list[int]]:
    """The start of a batched step of one-process matrices: their state packed, their step counts
    (one host read), and :func:`refresh` of each one due, before its moment is updated."""
    packing = batching.PackedState(states)
    steps_now = [int(step) for step in packing.get("step")[0].tolist()]
    for p, state, view, plan, step in zip(params, states, views, plans, steps_now):
        if subspace.refresh_due(step, plan, group):
            refresh(local(p.grad), state, group, view, plan, step)
    return packing, steps_now


def batch_key(p: torch.Tensor, view: MatrixShardView, plan, group: dict):
    """What a matrix shares with the others of its one-process batch (local shape, side, rank,
    device), or None where it steps alone: a row shard, low-precision weights, the ``hf`` form, full rank."""
    if group["adam_form"] == "torch" and p.dtype == torch.float32 and not view.sharded and not plan.full:
        return tuple(p.shape), plan.side, plan.rank, p.device
    return None
