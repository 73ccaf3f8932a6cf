"""Execution engines of the training job: how the model and the optimizer are spread over ranks.

Each engine wraps the model, builds the optimizer, runs backward/step, and says which rank writes
which part of a checkpoint. ``single`` and ``ddp`` are complete. ``fsdp2``/``hsdp`` (FSDP2
``fully_shard``) and ``zero1``/``zero2``/``zero3`` (DeepSpeed) plug in here through
:class:`PendingEngine` subclasses: until their integration modules exist, choosing them fails
before any work with a message that says what to use instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, RunConfig
from .dist import DistInfo


class EngineUnavailable(ConfigError):
    """The chosen engine cannot run in this installation."""


class Engine:
    """Single process: the model and the optimizer live whole on this rank."""

    name = "single"
    # True when every rank holds the whole model and optimizer state (rank 0 writes them).
    replicated = True

    def __init__(self, cfg: RunConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.module: nn.Module | None = None  # the unwrapped model
        self.model: nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None

    # -- before any work ------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> None:
        if info.world_size > 1:
            raise ConfigError(
                f"engine.name=single runs one process, but the launcher started {info.world_size}; "
                "use engine.name=ddp (or auto)"
            )

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.module = model.to(self.device)
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

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm before clipping; clips when ``max_norm > 0``."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        return self.module.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def describe(self) -> str:
        return f"{self.name} ({self.device.type})"


class DDPEngine(Engine):
    """torch DistributedDataParallel: every rank holds the whole model and optimizer state."""

    name = "ddp"

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> None:
        return None

    def wrap(self, module: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)

    def accumulating(self, last_micro: bool):
        if last_micro or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def describe(self) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return f"ddp x {self.info.world_size} ranks ({backend}, {self.device.type})"


class PendingEngine(Engine):
    """An engine whose integration module is not part of this build yet.

    ``requires`` names the distopt module the adapter calls; ``packages`` the third-party ones.
    To plug one in, subclass :class:`Engine` (``setup``, ``backward``, ``step``, the state-dict
    methods; ``replicated = False`` so every rank writes its own shard) and register it in
    :data:`ENGINES`.
    """

    requires = ""
    packages: tuple[str, ...] = ()
    extra = ""

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> None:
        instead = (
            "Use engine.name=ddp for now (every rank holds the whole model and optimizer state; "
            f"`distopt memory --model {cfg.model.name} --engines ddp,{cls.name}` shows what that costs per rank)."
        )
        if importlib.util.find_spec(cls.requires) is None:
            raise EngineUnavailable(
                f"engine.name={cls.name!r} is not available: it needs {cls.requires}, which this build of distopt "
                f"does not include yet. {instead}"
            )
        missing = [p for p in cls.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise EngineUnavailable(f"engine.name={cls.name!r} needs {', '.join(missing)}: {cls.extra} {instead}")
        raise EngineUnavailable(
            f"engine.name={cls.name!r}: {cls.requires} is installed, but the training job has no adapter "
            f"for it yet (launch/engines.py, {cls.__name__}). {instead}"
        )


class FSDP2Engine(PendingEngine):
    name = "fsdp2"
    requires = "distopt.engines.fsdp"


class HSDPEngine(FSDP2Engine):
    name = "hsdp"


class ZeroEngine(PendingEngine):
    name = "zero"
    requires = "distopt.deepspeed"
    packages = ("deepspeed",)
    extra = "pip install 'distopt[deepspeed]' (DS_BUILD_OPS=0 needs no compiler)."


class Zero1Engine(ZeroEngine):
    name = "zero1"


class Zero2Engine(ZeroEngine):
    name = "zero2"


class Zero3Engine(ZeroEngine):
    name = "zero3"


ENGINES: dict[str, type[Engine]] = {
    "single": Engine, "ddp": DDPEngine, "fsdp2": FSDP2Engine, "hsdp": HSDPEngine,
    "zero1": Zero1Engine, "zero2": Zero2Engine, "zero3": Zero3Engine,
}


def resolve(cfg: RunConfig, info: DistInfo) -> type[Engine]:
    """The engine class for this run, checked against the launch (raises before any work)."""
    name = cfg.engine.name
    if name == "auto":
        name = "ddp" if info.world_size > 1 else "single"
    if name == "ddp" and info.world_size == 1:
        name = "single"
    cls = ENGINES[name]
    cls.check(cfg, info)
    return cls
