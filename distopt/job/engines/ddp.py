"""``ddp``: torch ``DistributedDataParallel``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, cast

import torch.distributed as dist
from torch import nn

from ..config import RunConfig
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
        return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)

    def accumulating(self, last_micro: bool):
        if last_micro or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return cast("DistributedDataParallel", self.model).no_sync()

    def describe(self) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return f"ddp x {self.info.world_size} ranks ({backend}, {self.device.type})"


# -- FSDP2 / HSDP -------------------------------------------------------------------------------
