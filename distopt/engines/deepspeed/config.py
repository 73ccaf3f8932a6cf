"""The DeepSpeed config: the distopt optimizer it names, what is refused (each with its fix), and
:func:`initialize`."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from ...optim.base import SubspaceOptimizer
from .binding import ZeroBinding, attach, build_partitioned_optimizer
from .checkpoint import _guard_checkpoint_loading
from .names import CONFIG_PREFIX, DEEPSPEED_MIN, DEEPSPEED_RANGE, DEEPSPEED_TESTED_MAX

if TYPE_CHECKING:
    from deepspeed.runtime.config import DeepSpeedConfig

logger = logging.getLogger("distopt")



# ---------------------------------------------------------------------------------------------------
# Config handling and what is refused
# ---------------------------------------------------------------------------------------------------
def _load_config(config):
    if isinstance(config, dict):
        return copy.deepcopy(config)
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return copy.deepcopy(load_ds_config(config))


def split_optimizer_config(config: dict) -> tuple[str, dict, dict] | None:
    """``(name, params, config without "optimizer")`` when the config names a distopt optimizer."""
    spec = config.get("optimizer")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return None
    kind = spec["type"]
    if not kind.lower().startswith(CONFIG_PREFIX):
        return None
    name = kind[len(CONFIG_PREFIX):].lower().replace("_", "-")
    params = dict(spec.get("params") or {})
    rest = {k: v for k, v in config.items() if k != "optimizer"}
    return name, params, rest


class UnsupportedConfig(NotImplementedError, ValueError):
    """A DeepSpeed feature the adapter does not handle; the message names the config key and the fix."""


@dataclass(frozen=True)
class _Setup:
    """What the refusals look at."""

    ds_config: DeepSpeedConfig
    raw: dict
    model: torch.nn.Module
    mpu: object
    mesh_param: object

    @property
    def zero(self):
        return self.ds_config.zero_config

    @property
    def zraw(self) -> dict:
        return self.raw.get("zero_optimization") or {}

    @property
    def stage(self) -> int:
        return int(self.ds_config.zero_optimization_stage) if self.ds_config.zero_enabled else 0

    @property
    def bf16(self):
        return self.ds_config.bfloat16_config

    def offloaded(self, key: str) -> bool:
        offload = getattr(self.zero, key, None)
        device = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(device, "value", device) or "none").lower() not in ("none", "")


def _zeropp(s: _Setup) -> list[str]:
    z = s.zero
    used = {"zero_quantized_weights": getattr(z, "zero_quantized_weights", False),
            "zero_quantized_nontrainable_weights": getattr(z, "zero_quantized_nontrainable_weights", False),
            "zero_quantized_gradients": getattr(z, "zero_quantized_gradients", False),
            "zero_hpz_partition_size": (getattr(z, "zero_hpz_partition_size", 1) or 1) > 1}
    return [k for k, v in used.items() if v]


def _is_pipeline(model) -> bool:
    from deepspeed.pipe import PipelineModule

    return isinstance(model, PipelineModule)


def _has_moe(model) -> bool:
    from deepspeed.moe.utils import has_moe_layers

    return bool(has_moe_layers(model)[0])


def _fp32_accum(s: _Setup) -> bool:
    accum = s.ds_config.grad_accum_dtype
    return accum is not None and str(accum).lower() in ("fp32", "float32", "torch.float32")


_RESHARD_FIX = ("to resume on another data-parallel size use `python -m distopt.deepspeed convert` and "
                "distopt.deepspeed.load_full_state")

# What is refused, in the order checked: (config key, condition, why, fix). The first that holds raises
# UnsupportedConfig("<key>: <why>. Fix: <fix>.").
REFUSALS = (
    ("zero_optimization.offload_optimizer", lambda s: s.offloaded("offload_optimizer"),
     "optimizer offload runs the step on the host over DeepSpeed's CPU Adam partitions, and distopt's matrix "
     "step is not wired into it",
     "remove offload_optimizer (distopt's low-rank state is already a fraction of Adam's), or use DeepSpeed's "
     "own AdamW for offload"),
    ("zero_optimization.offload_param", lambda s: s.offloaded("offload_param"),
     "parameter offload is not supported with distopt optimizers yet", "remove offload_param"),
    ("zero_optimization.zenflow", lambda s: bool(s.zraw.get("zenflow")),
     "ZenFlow is not supported with distopt optimizers", "remove it"),
    ("zero_optimization.super_offload", lambda s: bool(s.zraw.get("super_offload")),
     "SuperOffload is not supported with distopt optimizers", "remove it"),
    ("fp16 / amp", lambda s: s.ds_config.float16_config.enabled or bool((s.raw.get("amp") or {}).get("enabled")),
     "fp16/AMP training is not supported with distopt optimizers yet", "use \"bf16\": {\"enabled\": true} (or fp32)"),
    ("torch_autocast", lambda s: bool(getattr(s.ds_config, "torch_autocast_enabled", False)),
     "torch_autocast is not supported with distopt optimizers yet", "use \"bf16\""),
    ("data_types.grad_accum_dtype", lambda s: s.bf16.enabled and s.stage == 1 and _fp32_accum(s),
     "bf16 with ZeRO stage 1 and grad_accum_dtype=fp32 makes DeepSpeed use its BF16_Optimizer, which distopt "
     "does not support",
     "drop grad_accum_dtype (or set it to \"bf16\") so stage 1 runs the ZeRO optimizer, or use ZeRO stage 2 or 3"),
    ("zero_optimization.stage", lambda s: s.bf16.enabled and s.stage == 0,
     "bf16 without ZeRO makes DeepSpeed wrap the optimizer in its BF16/FP16 wrappers, which distopt does not "
     "support", "use ZeRO stage 1, 2 or 3 with bf16, or stage 0 in fp32"),
    ("bf16.bf16_master_weights_and_grads", lambda s: s.bf16.enabled and getattr(s.bf16, "bf16_master_weights_and_grads", False),
     "not supported with distopt optimizers", "remove it (distopt keeps fp32 master weights and fp32 state)"),
    ("bf16.bf16_optimizer_states", lambda s: s.bf16.enabled and getattr(s.bf16, "bf16_optimizer_states", False),
     "not supported with distopt optimizers", "remove it (distopt keeps fp32 master weights and fp32 state)"),
    ("zero_optimization.fp16_master_weights_and_gradients", lambda s: bool(s.zraw.get("fp16_master_weights_and_gradients")),
     "not supported with distopt optimizers", "remove it"),
    ("zero_optimization.elastic_checkpoint", lambda s: s.stage in (1, 2) and getattr(s.zero, "elastic_checkpoint", False),
     "elastic checkpoints re-cut optimizer state as if it were element-wise, which would corrupt distopt's "
     "low-rank state", "remove it; " + _RESHARD_FIX),
    ("checkpoint.load_universal", lambda s: bool(s.ds_config.load_universal_checkpoint),
     "universal checkpoints hard-code Adam's element-wise state and cannot hold distopt's",
     "remove checkpoint.load_universal; " + _RESHARD_FIX),
    ("ZeRO++ (zero_quantized_*, zero_hpz_partition_size)", lambda s: bool(_zeropp(s)),
     "ZeRO++ is not supported with distopt optimizers yet: quantized weights and gradients or secondary "
     "partitions change what the optimizer receives", "remove these keys"),
    ("zero_optimization.mics_shard_size", lambda s: (getattr(s.zero, "mics_shard_size", -1) or -1) > 0,
     "MiCS is not supported with distopt optimizers", "remove it"),
    ("compile.deepcompile", lambda s: bool(getattr(s.ds_config.compile_config, "deepcompile", False)),
     "DeepCompile is not supported with distopt optimizers", "remove it"),
    ("managed_gradient_accumulation", lambda s: not getattr(s.ds_config, "managed_gradient_accumulation", True),
     "managed_gradient_accumulation=false is not supported with distopt optimizers yet", "remove it"),
    ("hybrid_engine", lambda s: bool(s.ds_config.hybrid_engine.enabled),
     "the hybrid engine is not supported with distopt optimizers", "disable it"),
    ("the model (PipelineModule)", lambda s: _is_pipeline(s.model),
     "pipeline parallelism is not supported with distopt optimizers yet: the pipeline engine and its "
     "BF16_Optimizer hand the optimizer per-stage flat buffers", "train the plain nn.Module with ZeRO stage 1, 2 or 3"),
    ("the model (MoE layers)", lambda s: _has_moe(s.model),
     "MoE layers (expert parallelism) are not supported with distopt optimizers yet",
     "train a model without deepspeed.moe layers"),
    ("mpu / tensor_parallel.autotp_size / mesh_param / sequence_parallel_size",
     lambda s: s.mpu is not None or (getattr(s.ds_config.tensor_parallel_config, "autotp_size", 0) or 0) > 1
     or s.mesh_param is not None or "sequence_parallel_size" in s.raw,
     "tensor, sequence or model parallelism is not supported with distopt optimizers yet: each rank's matrices "
     "would be slices of the true weights", "use data parallelism with ZeRO only"),
)


def check_supported(ds_config, raw: dict, model: torch.nn.Module, mpu=None, mesh_param=None) -> None:
    """Raise :class:`UnsupportedConfig` on the first DeepSpeed feature of :data:`REFUSALS` that the
    config or the model uses, naming the key and the fix."""
    setup = _Setup(ds_config, raw, model, mpu, mesh_param)
    for key, applies, why, fix in REFUSALS:
        if applies(setup):
            raise UnsupportedConfig(f"{key}: {why}. Fix: {fix}.")


def _check_model_parameters(model, model_parameters) -> None:
    if model_parameters is None:
        return
    given = []
    for item in model_parameters:
        if isinstance(item, dict):
            extra = sorted(set(item) - {"params"})
            if extra:
                raise ValueError(
                    f"model_parameters groups carry {extra}: distopt builds its own parameter groups from the model. "
                    "Set hyper-parameters in the config's optimizer.params (\"elementwise\" for the AdamW-stepped "
                    "parameters, \"rules\" to route parameters by name)."
                )
            given.extend(item["params"])
        else:
            given.append(item)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if {id(p) for p in given} != trainable:
        raise ValueError(
            "model_parameters must be the model's trainable parameters: distopt routes every trainable parameter "
            "of the model. To leave a parameter out, set requires_grad=False on it."
        )


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed older than the adapter supports (its ZeRO internals or results differ);
    warn once on one newer than it was tested with."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    from packaging.version import Version  # a dependency of DeepSpeed

    release = Version(version).release
    if release < DEEPSPEED_MIN:
        raise RuntimeError(
            f"DeepSpeed {version} is older than distopt's ZeRO adapter supports ({DEEPSPEED_RANGE}). Fix: pip install "
            f"\"{DEEPSPEED_RANGE}\" (with DS_BUILD_OPS=0 and --no-build-isolation for the source build)."
        )
    # A function attribute, which mypy cannot declare.
    if release > DEEPSPEED_TESTED_MAX and not check_deepspeed_version.warned:  # type: ignore[attr-defined]
        check_deepspeed_version.warned = True  # type: ignore[attr-defined]
        logger.warning("DeepSpeed %s is newer than distopt's adapter was tested with (%s); the adapter checks the "
                       "partition layout it reads and fails loudly if it changed", version, DEEPSPEED_RANGE)


check_deepspeed_version.warned = False  # type: ignore[attr-defined]  # a function attribute


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None):
    """``deepspeed.initialize`` that understands ``"optimizer": {"type": "distopt.<name>", "params": {...}}``.

    Returns the same ``(engine, optimizer, training_dataloader, lr_scheduler)`` tuple. With any other
    optimizer in the config (or a client ``optimizer``) the call is passed to ``deepspeed.initialize``
    unchanged. ``params`` are the optimizer's keyword arguments, plus ``rules`` (list of
    ``[regex, role]``), ``use_default_rules`` and ``elementwise`` (hyper-parameters of the AdamW-stepped
    parameters), as in :func:`distopt.build_optimizer`. The config's ``scheduler`` drives every group.
    """
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    from deepspeed.accelerator import get_accelerator
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

    if model is None:
        raise ValueError("distopt.deepspeed.initialize requires a model")
    port = TORCH_DISTRIBUTED_DEFAULT_PORT if distributed_port is None else distributed_port
    if config is None and config_params is not None:
        config = config_params
    from_args = None
    for key in ("deepspeed_config", "deepscale_config"):
        if getattr(args, key, None) is not None:
            if config is not None:
                raise ValueError("a DeepSpeed config was given both in args.deepspeed_config and as config=; pass one")
            from_args = config = getattr(args, key)
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass config=<path or dict> or --deepspeed_config <file>")
    passthrough = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=port, mpu=mpu,
                       dist_init_required=dist_init_required, collate_fn=collate_fn, mesh_param=mesh_param)
    loaded = _load_config(config)
    split = split_optimizer_config(loaded)
    if split is None:
        if isinstance(optimizer, SubspaceOptimizer):
            raise ValueError(
                "a distopt optimizer instance was passed to DeepSpeed: ZeRO would flatten its groups into slices "
                "that span several matrices. Fix: name it in the config instead, "
                "\"optimizer\": {\"type\": \"distopt.<name>\", \"params\": {...}}."
            )
        return deepspeed.initialize(config=None if from_args else config, **passthrough)
    name, params, rest = split
    if optimizer is not None:
        raise ValueError("the config names a distopt optimizer and optimizer= was passed too; use one of them")
    _check_model_parameters(model, model_parameters)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), distributed_port=port,
                               dist_init_required=dist_init_required)
    from deepspeed.runtime.config import DeepSpeedConfig

    check_supported(DeepSpeedConfig(copy.deepcopy(rest), mpu), rest, model, mpu, mesh_param)
    rest["zero_allow_untested_optimizer"] = True  # distopt steps ZeRO's partitions through this adapter
    build_args = {k: params.pop(k) for k in ("rules", "use_default_rules", "elementwise") if k in params}
    opt = build_partitioned_optimizer(model, name, **build_args, **params)
    if args is not None and from_args is not None:
        args = copy.copy(args)
        for key in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, key):
                setattr(args, key, None)
    passthrough.update(args=args, optimizer=opt, model_parameters=None)
    engine, zopt, loader, scheduler = deepspeed.initialize(config=rest, **passthrough)
    attach(engine, opt)
    _guard_checkpoint_loading(engine)
    logger.info("distopt.%s under DeepSpeed ZeRO-%d: %d groups", name, cast(ZeroBinding, opt.binding).stage, len(opt.param_groups))
    return engine, zopt, loader, scheduler


