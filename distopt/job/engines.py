"""Execution engines of the training job: how the model and the optimizer are spread over ranks.

Each engine wraps the model, builds the optimizer, runs backward/step, and says how a checkpoint
is written. ``check`` runs before any work (no process group, no memory) and refuses a launch the
engine cannot run, with the fix.

``single``
    One process; the model and the optimizer live whole on it.
``ddp``
    torch ``DistributedDataParallel``: every rank holds the whole model and optimizer state; rank 0
    writes ``model.pt`` and ``optimizer.pt``.
``fsdp2``
    FSDP2 ``fully_shard`` on each decoder layer and on the root, over a 1-D mesh of every rank
    (one process works too). The algorithm's model surgery (RSO's ``reparametrize``) runs before
    sharding; the optimizer is then built on the DTensor parameters and keeps its state sharded by
    rows. Gradient accumulation skips the reduce-scatter until the last micro-batch
    (``set_requires_gradient_sync``). Precision: ``fp32`` as is; ``bf16-mixed`` is FSDP2's
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (fp32 sharded weights, bf16
    all-gathers and compute, fp32 gradient reduction) with the job's autocast kept for the ops it
    runs in fp32; ``bf16`` shards the bf16 parameters as they are. Both reduce gradients in
    ``train.reduce_dtype`` (fp32 by default). Checkpoints go through
    ``torch.distributed.checkpoint`` (:mod:`distopt.checkpoint`) into ``dcp/``: a checkpoint
    written on N ranks resumes on any number of ranks, and with ``hsdp``.
``hsdp``
    ``fsdp2`` on a 2-D mesh ``(engine.hsdp_replicas, world / hsdp_replicas)``: parameters and state
    are sharded inside each replica group and replicated across groups.
``zero1`` / ``zero2`` / ``zero3``
    DeepSpeed ZeRO through :func:`distopt.deepspeed.initialize`, which steps ZeRO's partitions with
    the distopt optimizer. The DeepSpeed config is built from the run config, or read from
    ``engine.deepspeed_config`` (:mod:`distopt.job.ds_config` says which side wins). DeepSpeed owns
    precision (``bf16`` and ``bf16-mixed`` both map to its ``bf16``: bf16 weights and compute,
    fp32 master partitions and optimizer math; the job neither casts parameters nor autocasts),
    gradient accumulation and clipping; its scheduler, when the JSON has one, owns the learning
    rate. Checkpoints are DeepSpeed's own (``deepspeed/``, every rank writes its partitions) and
    resume on any number of ranks: another number is merged into one name-keyed file by rank 0
    (``distopt.deepspeed.convert_checkpoint``) and each rank takes its new share.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, RunConfig, optimizer_kwargs
from .dist import DistInfo
from .ds_config import deepspeed_config, json_stage

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
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor gradients (FSDP2) give a DTensor norm
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def last_grad_norm(self) -> float:
        return math.nan

    def current_lr(self) -> float:
        """The learning rate of the matrix parameters (the first group when there are none)."""
        groups = self.optimizer.param_groups
        return float(next((g for g in groups if g.get("kind") == "matrix"), groups[0])["lr"])

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
        return self.model.no_sync()

    def describe(self) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return f"ddp x {self.info.world_size} ranks ({backend}, {self.device.type})"


# -- FSDP2 / HSDP -------------------------------------------------------------------------------
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
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        self.module = self.model = module
        self.optimizer = build_optimizer(module)

    def accumulating(self, last_micro: bool):
        self.model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    # DCP checkpoints, resharded on load to whatever world size and mesh this run has.
    def save_sharded(self, folder: Path) -> None:
        from distopt import checkpoint

        checkpoint.save(folder / "dcp", self.module, self.optimizer)

    def load_sharded(self, folder: Path) -> None:
        from distopt import checkpoint

        try:
            checkpoint.load(folder / "dcp", self.module, self.optimizer)
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


class ZeroEngine(Engine):
    """DeepSpeed ZeRO with the distopt optimizer stepping ZeRO's partitions (distopt.deepspeed)."""

    name = "zero"
    stage = 0
    replicated = False
    owns_precision = True
    TAG = "zero"  # the DeepSpeed checkpoint tag inside each checkpoint folder

    @classmethod
    def check(cls, cfg: RunConfig, info: DistInfo) -> list[str]:
        for module, fix in (("deepspeed", "pip install 'distopt[deepspeed]' (DS_BUILD_OPS=0 needs no compiler)"),
                            ("distopt.deepspeed", "reinstall distopt")):
            if importlib.util.find_spec(module) is None:
                raise EngineUnavailable(
                    f"engine.name={cls.name!r} needs {module}, which is not installed: {fix}. Or use engine.name=fsdp2 "
                    f"(`distopt memory --model {cfg.model.name} --engines fsdp2,{cls.name}` compares the memory per rank)."
                )
        if cfg.engine.device == "cpu" or (cfg.engine.device == "auto" and not torch.cuda.is_available()):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no probing for GPUs
        try:
            config, notes = deepspeed_config(cfg, info, cls.stage)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # a value of the wrong type in the JSON
            raise ConfigError(f"engine.deepspeed_config={cfg.engine.deepspeed_config!r}: {err}") from None
        if cfg.optim.name == "rso":
            raise ConfigError(
                f"optim.name='rso' with engine.name={cls.name}: RSO swaps linear layers for reparametrized ones, which "
                "DeepSpeed's flattened partitions do not allow. Use engine.name=fsdp2 (or ddp) for rso."
            )
        from distopt.engines.deepspeed import check_supported

        try:
            from deepspeed.runtime.config import DeepSpeedConfig

            probe = {k: v for k, v in config.items() if k != "optimizer"}
            check_supported(DeepSpeedConfig(dict(probe)), probe, nn.Module())
        except (ValueError, NotImplementedError, AssertionError) as err:  # pydantic's errors are ValueErrors
            where = f"engine.deepspeed_config={cfg.engine.deepspeed_config!r}" if cfg.engine.deepspeed_config else f"engine.name={cls.name}"
            raise ConfigError(f"{where}: {err}") from None
        return notes

    def setup(self, model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        import distopt.deepspeed as dds

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        _single_process_group(self.device)
        config, _ = deepspeed_config(self.cfg, self.info, self.stage)
        try:
            engine, _, _, scheduler = dds.initialize(model=model.to(self.device), config=config)
        except (ValueError, NotImplementedError) as err:
            raise ConfigError(f"engine.name={self.name}: {err}") from None
        self.ds = engine
        self.model = engine
        self.module = engine.module
        self.optimizer = engine.basic_optimizer
        self.schedules_lr = scheduler is not None
        self._last_micro = True
        self._norm = None

    def accumulating(self, last_micro: bool):
        self._last_micro = last_micro
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The job already divides the loss by the accumulation steps. DeepSpeed counts micro-steps
        # to find the accumulation boundary, so every micro-batch gets its step(); only the last
        # one (in step() below) reduces, clips and updates.
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self._last_micro:
            self.ds.step()

    def clip_grad_norm(self, max_norm: float) -> None:
        return None  # DeepSpeed clips (gradient_clipping) inside its step

    def step(self) -> None:
        self.ds.step()
        self._norm = self.ds.get_global_grad_norm()

    def last_grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def save_sharded(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder / "deepspeed"), tag=self.TAG)

    def load_sharded(self, folder: Path) -> None:
        from distopt.deepspeed import convert_checkpoint, load_full_state, saved_dp_world_size

        load_dir = folder / "deepspeed"
        if not (load_dir / self.TAG).is_dir():
            raise ValueError(f"{folder} holds no DeepSpeed checkpoint ({load_dir / self.TAG} is missing)")
        saved, current = saved_dp_world_size(str(load_dir), self.TAG), self.ds.seq_dp_world_size
        if saved == current:
            path, _ = self.ds.load_checkpoint(str(load_dir), tag=self.TAG)
            if path is None:
                raise ValueError(f"DeepSpeed could not load {load_dir}")
            return
        # ZeRO partitions (and the row blocks built from them) depend on the number of ranks: merge
        # every rank's state into one name-keyed file, then let each rank take its new share.
        merged = self.cfg.output_dir / "checkpoints" / f".{folder.name}.dp{saved}-merged.pt"
        if self.info.is_main:
            logging.getLogger("distopt.train").warning(
                "%s was written by %d data-parallel ranks and this run has %d: converting its ZeRO state "
                "(python -m distopt.deepspeed convert)", folder, saved, current)
            convert_checkpoint(str(load_dir), str(merged), tag=self.TAG)
        dist.barrier()
        try:
            load_full_state(self.ds, str(merged))
        finally:
            dist.barrier()
            if self.info.is_main:
                merged.unlink(missing_ok=True)

    def describe(self) -> str:
        import deepspeed

        precision = "bf16, fp32 masters" if self.ds.bfloat16_enabled() else "fp32"
        return (f"{self.name} x {self.info.world_size} rank(s) (DeepSpeed {deepspeed.__version__}, {dist.get_backend()}, "
                f"{self.device.type}, {precision})")


class Zero1Engine(ZeroEngine):
    name = "zero1"
    stage = 1


class Zero2Engine(ZeroEngine):
    name = "zero2"
    stage = 2


class Zero3Engine(ZeroEngine):
    name = "zero3"
    stage = 3


ENGINES: dict[str, type[Engine]] = {
    "single": Engine, "ddp": DDPEngine, "fsdp2": FSDP2Engine, "hsdp": HSDPEngine,
    "zero1": Zero1Engine, "zero2": Zero2Engine, "zero3": Zero3Engine,
}


def resolve(cfg: RunConfig, info: DistInfo, notes: list[str] | None = None) -> type[Engine]:
    """The engine class for this run, checked against the launch (raises before any work).

    ``engine.name=auto`` is zero<stage> when ``engine.deepspeed_config`` is set (the JSON's
    ``zero_optimization.stage``), else ddp for several processes and single for one. The
    engine's notes (e.g. DeepSpeed config values that replaced the run config's) go to ``notes``."""
    name = cfg.engine.name
    if name == "auto":
        if cfg.engine.deepspeed_config:
            stage = json_stage(cfg.engine.deepspeed_config)
            if stage not in (1, 2, 3):
                raise ConfigError(
                    f"engine.deepspeed_config={cfg.engine.deepspeed_config!r} has zero_optimization.stage={stage}: the job "
                    "runs ZeRO stage 1, 2 or 3 through DeepSpeed (set the stage), or plain data parallelism with "
                    "engine.name=ddp (without the DeepSpeed config)"
                )
            name = f"zero{stage}"
        else:
            name = "ddp" if info.world_size > 1 else "single"
    if name == "ddp" and info.world_size == 1:
        name = "single"
    cls = ENGINES[name]
    found = cls.check(cfg, info) or []
    if notes is not None:
        notes.extend(found)
    return cls
