"""``fsdp2`` and ``hsdp``: FSDP2 ``fully_shard`` on each decoder layer and the root."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig, optimizer_kwargs
from ..dist import DistInfo
from .base import Engine, EngineUnavailable, _single_process_group

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule



def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks (``model.layers`` of a LLaMA), each its own FSDP2 unit."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] == "layers":
            return list(child)
    return []


def prepare_model(module: nn.Module, cfg: RunConfig) -> None:
    """Model surgery the algorithm needs before sharding (RSO's ``reparametrize``), if any."""
    from distopt.optim import REGISTRY

    reparametrize = getattr(REGISTRY[cfg.optim.name], "reparametrize", None)
    if reparametrize is not None:
        kwargs = optimizer_kwargs(cfg)
        kwargs.pop("elementwise", None)
        reparametrize(module, **kwargs)


class FSDP2Engine(Engine):
    """FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded by rows over the ranks."""

    name = "fsdp2"
    replicated = False

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> list[str]:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
        except ImportError:
            raise EngineUnavailable(
                f"engine.name={cls.name!r} needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                f"this torch is {torch.__version__}. Use engine.name=ddp or upgrade torch."
            ) from None
        return []

    @classmethod
    def reads_checkpoint_of(cls, engine: str) -> bool:
        return engine in ("fsdp2", "hsdp")  # DCP: any layout reads any other

    def mesh_shape(self) -> tuple[int, ...]:
        return (self.info.world_size,)

    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        shape = self.mesh_shape()
        names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        reduce = torch.float32 if self.cfg.train.reduce_dtype == "fp32" else torch.bfloat16
        if self.cfg.train.precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        if self.cfg.train.precision == "bf16":  # bf16 parameters sharded as they are; the sums in reduce_dtype
            return MixedPrecisionPolicy(reduce_dtype=reduce)
        return MixedPrecisionPolicy()

    def setup(self, model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        from torch.distributed.fsdp import fully_shard

        _single_process_group(self.device)
        module = model.to(self.device)
        prepare_model(module, self.cfg)  # before fully_shard, which only shards what exists then
        mesh, policy = self.mesh(), self.mp_policy()
        on = self.sharding_mesh(mesh)
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=on, mp_policy=policy)
        fully_shard(module, mesh=on, mp_policy=policy)
        self.module = self.model = module
        self.optimizer = build_optimizer(module)
        self.after_optimizer(mesh)

    def sharding_mesh(self, mesh):
        """The mesh ``fully_shard`` runs on (all of it, but for HSDP's projected sync)."""
        return mesh

    def after_optimizer(self, mesh) -> None:
        """Set-up that needs the optimizer built (HSDP's projected sync)."""

    def accumulating(self, last_micro: bool):
        cast("FSDPModule", self.model).set_requires_gradient_sync(last_micro)  # fully_shard made it one
        return contextlib.nullcontext()

    # DCP checkpoints, resharded on load to whatever world size and mesh this run has.
    def save_sharded(self, folder: Path) -> None:
        from distopt import checkpoint

        checkpoint.save(folder / "dcp", cast(nn.Module, self.module), cast(torch.optim.Optimizer, self.optimizer))

    def load_sharded(self, folder: Path) -> None:
        from distopt import checkpoint

        try:
            checkpoint.load(folder / "dcp", cast(nn.Module, self.module), cast(torch.optim.Optimizer, self.optimizer))
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None

    def describe(self) -> str:
        shape = " x ".join(str(s) for s in self.mesh_shape())
        return f"{self.name} mesh ({shape}) of {self.info.world_size} rank(s) ({dist.get_backend()}, {self.device.type})"


class HSDPEngine(FSDP2Engine):
    """FSDP2 on a 2-D mesh: sharded within a replica group, replicated across groups."""

    name = "hsdp"

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> list[str]:
        notes = super().check(cfg, info)
        replicas = cfg.engine.hsdp_replicas
        if replicas < 1 or info.world_size % replicas:
            divisors = [d for d in range(1, info.world_size + 1) if info.world_size % d == 0]
            raise ConfigError(
                f"engine.hsdp_replicas={replicas}: must divide the world size ({info.world_size} rank(s)): the mesh is "
                f"(replicas, world / replicas). Use one of {', '.join(map(str, divisors))}"
            )
        return notes

    def mesh_shape(self) -> tuple[int, ...]:
        replicas = self.cfg.engine.hsdp_replicas
        return (replicas, self.info.world_size // replicas)

    # Projected sync: each replica group is a plain FSDP2 run on the shard sub-mesh, and the optimizer
    # averages across the groups (distopt.engines.hsdp).
    def sharding_mesh(self, mesh):
        return mesh["shard"] if self.cfg.engine.grad_sync == "projected" else mesh

    def after_optimizer(self, mesh) -> None:
        if self.cfg.engine.grad_sync != "projected":
            return
        from distopt.engines.hsdp import sync_by_projection

        try:
            self.projected_sync = sync_by_projection(cast(nn.Module, self.module), self.optimizer, mesh)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def clip_grad_norm(self, max_norm: float) -> float | None:
        sync = getattr(self, "projected_sync", None)
        if sync is None:
            return super().clip_grad_norm(max_norm)
        sync.reduce_others()  # after the last backward of the step, before the optimizer reads them
        return self.clip_synced_grad_norm(max_norm)

    def describe(self) -> str:
        sync = getattr(self, "projected_sync", None)
        return super().describe() + (f"; {sync.describe()}" if sync is not None else "")
