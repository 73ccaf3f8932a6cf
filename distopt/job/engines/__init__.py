"""Execution engines of the training job: how the model and the optimizer are spread over ranks.

Each engine wraps the model, builds the optimizer, runs backward/step, and says how a checkpoint
is written. ``check`` runs before any work (no process group, no memory) and refuses a launch the
engine cannot run, with the fix.

``single``
    One process; the model and the optimizer live whole on it.
``ddp``
    torch ``DistributedDataParallel``: every rank holds the whole model and optimizer state; rank 0
    writes ``model.pt`` and ``optimizer.pt``. ``engine.grad_sync=projected`` leaves the matrices out
    of DDP's all-reduce and lets the optimizer average their projections
    (:mod:`distopt.engines.ddp`): the same numbers, a fraction ``r/d`` of their traffic.
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
    are sharded inside each replica group and replicated across groups. ``engine.grad_sync=projected``
    shards on the ``shard`` sub-mesh only and lets the optimizer average across the groups
    (:mod:`distopt.engines.hsdp`).
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

from ..config import ConfigError, RunConfig
from ..dist import DistInfo
from ..ds_config import json_stage
from .base import ZERO_ENGINES, Engine, EngineUnavailable
from .ddp import DDPEngine
from .fsdp2 import FSDP2Engine, HSDPEngine, decoder_layers, prepare_model
from .zero import Zero1Engine, Zero2Engine, Zero3Engine, ZeroEngine

__all__ = ["ENGINES", "ZERO_ENGINES", "DDPEngine", "Engine", "EngineUnavailable", "FSDP2Engine", "HSDPEngine", "Zero1Engine",
           "Zero2Engine", "Zero3Engine", "ZeroEngine", "decoder_layers", "prepare_model", "resolve"]

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
    if cfg.engine.grad_sync == "projected" and name not in ("ddp", "hsdp"):
        raise ConfigError(
            f"engine.grad_sync=projected averages gradients across data-parallel replicas, which engine {name} "
            + ("does not have (one process)" if name == "single" else "does not offer it yet")
            + ": use engine.name=ddp or hsdp on several ranks, or engine.grad_sync=full"
        )
    found = cls.check(cfg, info) or []
    if notes is not None:
        notes.extend(found)
    return cls
