"""``ddp``: torch ``DistributedDataParallel``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, cast

import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..dist import DistInfo
from .base import Engine

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel



class DDPEngine(Engine):
    """torch DistributedDataParallel: every rank holds the whole model and optimizer state."""

    name = "ddp"

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> list[str]:
        return []

    def wrap(self, module: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
        if self.cfg.engine.grad_sync == "projected":
            from distopt.engines.ddp import sync_by_projection

            try:
                self.projected_sync = sync_by_projection(ddp, self.optimizer)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return ddp

    def clip_grad_norm(self, max_norm: float) -> float | None:
        if getattr(self, "projected_sync", None) is not None:
            return self.clip_synced_grad_norm(max_norm)
        return super().clip_grad_norm(max_norm)

    def accumulating(self, last_micro: bool):
        if last_micro or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return cast("DistributedDataParallel", self.model).no_sync()

    def describe(self) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        sync = getattr(self, "projected_sync", None)
        how = f"; {sync.describe()}" if sync is not None else ""
        return f"ddp x {self.info.world_size} ranks ({backend}, {self.device.type}{how})"


# -- FSDP2 / HSDP -------------------------------------------------------------------------------
