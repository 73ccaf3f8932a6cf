"""What every engine does: wrap the model, build the optimizer, step, checkpoint (``single`` is this class)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from ... import api
from ..config import ConfigError, RunConfig
from ..dist import DistInfo

if TYPE_CHECKING:
    import distopt

logger = logging.getLogger("distopt.train")

ZERO_ENGINES = ("zero1", "zero2", "zero3")


class EngineUnavailable(ConfigError):
    """The chosen engine cannot run in this installation."""


def _single_process_group(device: torch.device) -> None:
    """A process group of one rank, for engines that need one even when the launch has a single process."""
    if dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class Engine:
    """Single process: the model and the optimizer live whole on this rank."""

    name = "single"
    # True when every rank holds the whole model and optimizer state (rank 0 writes them).
    replicated = True
    # True when the engine handles bf16 itself: the job then neither casts parameters nor autocasts.
    owns_precision = False

    def __init__(self, cfg: RunConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        # None until setup(); the methods below run after it, hence their casts.
        self.module: nn.Module | None = None  # the unwrapped model
        self.model: nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None
        # True when the engine's own scheduler sets the learning rate (the job's schedule is then unused).
        self.schedules_lr = False

    # -- before any work ------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> list[str]:
        """Refuse a launch this engine cannot run (ConfigError); return notes for the user."""
        if info.world_size > 1:
            raise ConfigError(
                f"engine.name=single runs one process, but the launcher started {info.world_size}; "
                "use engine.name=ddp (or auto)"
            )
        return []

    @classmethod
    def reads_checkpoint_of(cls, engine: str) -> bool:
        """Whether a checkpoint written by ``engine`` can be resumed with this one."""
        return engine == cls.name or (cls.replicated and engine in ("single", "ddp"))

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.module = model.to(self.device)
        # Same-shape weights back to back, before anything holds their storage (DDP): a batched step
        # then writes each batch's weights with one kernel.
        api.pack_weights(self.module)
        # The optimizer first: some algorithms reparametrize the model they are built for (RSO).
        self.optimizer = build_optimizer(self.module)
        self.model = self.wrap(self.module)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    # -- a step ---------------------------------------------------------------------------------
    def accumulating(self, last_micro: bool):
        """Context for a micro-step's forward and backward; gradients sync only on the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float | None:
        """Global gradient norm before clipping; clips when ``max_norm > 0``. None from engines that
        clip inside :meth:`step`; :meth:`last_grad_norm` then has the norm after it."""
        params = [p for p in cast(nn.Module, self.module).parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor gradients (FSDP2) give a DTensor norm
            norm = norm.full_tensor()
        return float(norm)

    def clip_synced_grad_norm(self, max_norm: float) -> float:
        """Under projected gradient sync: the norm of what is synced (the matrices' projections, the
        other gradients whole), the same on every replica, where torch's ``clip_grad_norm_`` would
        measure each rank's own matrix gradients. Clips when ``max_norm > 0``."""
        optimizer = cast("distopt.SubspaceOptimizer", self.optimizer)
        return float(optimizer.clip_grad_norm_(max_norm if max_norm > 0 else math.inf))

    def step(self) -> None:
        optimizer = cast(torch.optim.Optimizer, self.optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def last_grad_norm(self) -> float | None:
        return math.nan

    def current_lr(self) -> float:
        """The learning rate of the matrix parameters (the first group when there are none)."""
        groups = cast(torch.optim.Optimizer, self.optimizer).param_groups
        return float(next((g for g in groups if g.get("kind") == "matrix"), groups[0])["lr"])

    # -- checkpoints ----------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        return cast(nn.Module, self.module).state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        cast(nn.Module, self.module).load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        return cast(torch.optim.Optimizer, self.optimizer).state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        cast(torch.optim.Optimizer, self.optimizer).load_state_dict(state)

    def describe(self) -> str:
        return f"{self.name} ({self.device.type})"
