"""``zero1`` / ``zero2`` / ``zero3``: DeepSpeed ZeRO through :func:`distopt.deepspeed.initialize`."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..dist import DistInfo
from ..ds_config import deepspeed_config
from .base import Engine, EngineUnavailable, _single_process_group


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
