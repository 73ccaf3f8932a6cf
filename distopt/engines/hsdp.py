"""Projected gradient sync for HSDP: the replicate dimension run by distopt, not by FSDP2.

HSDP on a ``(replicate, shard)`` mesh reduce-scatters each gradient inside a replica group and then
all-reduces the shards across the groups: the traffic that crosses nodes. FSDP2's
``set_requires_all_reduce(False)`` keeps the reduce-scattered gradients aside for a later backward
instead of handing them to the optimizer, so the projected mode shards the model with
``fully_shard`` on the ``shard`` sub-mesh only (each replica group is then a plain FSDP2 run) and
averages across groups itself:

- the matrices through their projections and refresh sketches (exact, as under DDP: see
  :mod:`distopt.engines.ddp`), over ``mesh["replicate"]``;
- every other gradient in full, by :meth:`ProjectedHSDPSync.reduce_others`, which the training loop
  calls after the last backward of a step and before clipping or ``step()``.

Optimizer state, checkpoints (DCP) and resharding are those of FSDP2 on the shard mesh; every
replica group holds the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import comm
from ..core.shard import local


@dataclass
class ProjectedHSDPSync:
    """What :func:`sync_by_projection` set up."""

    group: object  # the replicate process group
    synced: list[torch.Tensor] = field(default_factory=list)
    others: list[torch.nn.Parameter] = field(default_factory=list)

    def reduce_others(self) -> None:
        """Average the gradients of everything the optimizer does not sync by projection over the
        replica groups: one all-reduce per dtype."""
        grads = [local(p.grad) for p in self.others if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same in by_dtype.values():
            for grad, mean in zip(same, comm.replica_mean_coalesced([g.float() for g in same], self.group)):
                grad.copy_(mean)

    def describe(self) -> str:
        return (f"grad_sync=projected: {len(self.synced)} matrices averaged through their projections over "
                f"{comm.world_size(self.group)} replica groups; the other parameters all-reduced in full")


def sync_by_projection(model: torch.nn.Module, optimizer, mesh) -> ProjectedHSDPSync:
    """Average ``optimizer``'s matrices over the ``replicate`` dimension of the 2-D ``mesh`` through
    their projections. ``model`` must be sharded with ``fully_shard(..., mesh=mesh["shard"])``: a
    model sharded on the 2-D mesh is all-reduced across groups by FSDP2 already, and is refused."""
    if mesh.ndim != 2 or mesh.mesh_dim_names is None or "replicate" not in mesh.mesh_dim_names:
        raise ValueError("sync_by_projection needs the 2-D (replicate, shard) mesh, with named dimensions")
    for name, p in model.named_parameters():
        dims = getattr(getattr(p, "device_mesh", None), "ndim", None)
        if dims is not None and dims != 1:
            raise ValueError(
                f"{name} is sharded on a {dims}-D mesh: FSDP2 then all-reduces it across the replica groups "
                "itself. For the projected sync, shard with fully_shard(module, mesh=mesh['shard'])."
            )
    replicas = mesh.get_group("replicate")
    synced = optimizer.sync_by_projection(replicas)
    ids = {id(p) for p in synced}
    others = [p for p in model.parameters() if id(p) not in ids]
    return ProjectedHSDPSync(replicas, synced, others)
