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
    ``engine.deepspeed_config`` (see :func:`deepspeed_config` for which side wins). DeepSpeed owns
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
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, RunConfig
from .dist import DistInfo

logger = logging.getLogger("distopt.train")

ZERO_ENGINES = ("zero1", "zero2", "zero3")


class EngineUnavailable(ConfigError):
    """The chosen engine cannot run in this installation."""


def optimizer_kwargs(cfg: RunConfig) -> dict:
    """Keyword arguments of ``distopt.build_optimizer`` from the ``optim`` section."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, **o.hparams)
    if o.elementwise_lr:
        kwargs["elementwise"] = {"lr": o.elementwise_lr}
    return kwargs


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


# -- DeepSpeed ZeRO -------------------------------------------------------------------------------
def _explicit(cfg: RunConfig, key: str) -> bool:
    """Whether ``key`` (or a section holding it) was set on the command line."""
    given = getattr(cfg, "explicit_keys", frozenset())
    return any(key == k or key.startswith(k + ".") for k in given)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def read_deepspeed_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"engine.deepspeed_config={path!r}: cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"engine.deepspeed_config={path!r}: the top level must be a JSON object")
    return data


def json_stage(path: str) -> int:
    zero = read_deepspeed_json(path).get("zero_optimization") or {}
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"engine.deepspeed_config={path!r}: zero_optimization.stage={zero.get('stage')!r} is not a number") from None


class _Merge:
    """Reconciles one DeepSpeed JSON value with the run config's, recording what happened."""

    def __init__(self, cfg: RunConfig, source: str):
        self.cfg, self.source, self.notes = cfg, source, []

    def pick(self, run_key: str, mine, theirs, json_key: str, adopt: Callable[[object], None]):
        """The value both sides use: the JSON's, unless absent or ``run_key`` was given on the command line."""
        if theirs is None or theirs == "auto" or _same(mine, theirs):  # "auto": DeepSpeed's word for "the caller's"
            return mine
        if _explicit(self.cfg, run_key):
            self.notes.append(f"{run_key}={mine!r} from the command line replaces {json_key}={theirs!r} of {self.source}")
            return mine
        self.notes.append(f"{self.source} sets {json_key}={theirs!r}: {run_key} {mine!r} -> {theirs!r}")
        adopt(theirs)
        return theirs


def deepspeed_config(cfg: RunConfig, info: DistInfo, stage: int) -> tuple[dict, list[str]]:
    """The DeepSpeed config of this run and notes on how it was made; may change ``cfg``.

    Without ``engine.deepspeed_config`` it is built from the run config. With it, the JSON is the
    base and the run config fills only what it lacks. Where both set a value, precedence is: run
    config file < DeepSpeed JSON < command-line overrides. The value used is written back into
    ``cfg``, so the resolved ``config.yaml``, the batch arithmetic and the optimizer checks match
    what DeepSpeed runs, and every difference is reported. Mapped keys:
    ``train_micro_batch_size_per_gpu`` = train.batch_size, ``gradient_accumulation_steps`` =
    train.grad_accum, ``gradient_clipping`` = train.clip_grad_norm, ``bf16.enabled`` = train.precision
    != fp32, ``optimizer`` = ``distopt.<optim.name>`` with the ``optim`` section as ``params``
    (``hparams`` flattened, ``elementwise_lr`` as ``elementwise.lr``). A JSON ``scheduler`` sets the
    learning rate and replaces ``schedule.*`` (unless a schedule key is given on the command line,
    which drops the JSON's scheduler). ``zero_optimization.stage`` must match the engine.
    """
    path = cfg.engine.deepspeed_config
    raw = read_deepspeed_json(path) if path else {}
    merge = _Merge(cfg, f"engine.deepspeed_config ({Path(path).name})" if path else "")

    # ZeRO stage: engine.name=auto took it from the JSON; an explicit name must agree with it.
    zero = dict(raw.get("zero_optimization") or {})
    if "stage" in zero and int(zero["stage"]) != stage:
        raise ConfigError(
            f"engine.name=zero{stage} but engine.deepspeed_config={path!r} has zero_optimization.stage={zero['stage']}: "
            "make them agree, or set engine.name=auto to take the stage from the JSON"
        )
    zero["stage"] = stage
    raw["zero_optimization"] = zero

    train = cfg.train

    def setter(section, name, kind):
        return lambda value: setattr(section, name, kind(value))

    # Batch: a JSON train_batch_size must be micro x accumulation x ranks.
    total = raw.pop("train_batch_size", None)
    world = info.world_size
    if total is not None:  # derive what the JSON leaves out, as DeepSpeed does
        total = int(total)
        if "train_micro_batch_size_per_gpu" not in raw and "gradient_accumulation_steps" in raw:
            raw["train_micro_batch_size_per_gpu"] = total // max(1, int(raw["gradient_accumulation_steps"]) * world)
        elif "gradient_accumulation_steps" not in raw and "train_micro_batch_size_per_gpu" in raw:
            raw["gradient_accumulation_steps"] = total // max(1, int(raw["train_micro_batch_size_per_gpu"]) * world)
        elif "gradient_accumulation_steps" not in raw:
            raw["train_micro_batch_size_per_gpu"], raw["gradient_accumulation_steps"] = total // world, 1
    micro = merge.pick("train.batch_size", train.batch_size, raw.get("train_micro_batch_size_per_gpu"),
                       "train_micro_batch_size_per_gpu", setter(train, "batch_size", int))
    accum = merge.pick("train.grad_accum", train.grad_accum, raw.get("gradient_accumulation_steps"),
                       "gradient_accumulation_steps", setter(train, "grad_accum", int))
    if total is not None and total != micro * accum * world:
        raise ConfigError(
            f"engine.deepspeed_config={path!r}: train_batch_size={total} is not train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x ranks ({world}) = {micro * accum * world}; remove train_batch_size "
            "(it follows from the other two) or make them agree"
        )
    if int(micro) < 1 or int(accum) < 1:
        raise ConfigError(f"engine.deepspeed_config={path!r}: micro-batch {micro} and gradient accumulation {accum} must be >= 1")
    raw["train_micro_batch_size_per_gpu"], raw["gradient_accumulation_steps"] = int(micro), int(accum)
    raw["gradient_clipping"] = float(merge.pick("train.clip_grad_norm", train.clip_grad_norm, raw.get("gradient_clipping"),
                                                "gradient_clipping", setter(train, "clip_grad_norm", float)))

    # Precision: DeepSpeed's bf16 (fp32 master partitions) stands for both bf16 and bf16-mixed.
    bf16_key = "bfloat16" if "bfloat16" in raw and "bf16" not in raw else "bf16"
    block = raw.get(bf16_key) if isinstance(raw.get(bf16_key), dict) else {}
    theirs = block.get("enabled")
    if isinstance(theirs, bool) and theirs != (train.precision != "fp32"):  # "auto" or absent: the run config decides
        if _explicit(cfg, "train.precision"):
            merge.notes.append(f"train.precision={train.precision!r} from the command line replaces {bf16_key}.enabled="
                               f"{str(theirs).lower()} of {merge.source}")
        else:
            wanted = "bf16-mixed" if theirs else "fp32"
            merge.notes.append(f"{merge.source} sets {bf16_key}.enabled={str(theirs).lower()}: train.precision "
                               f"{train.precision!r} -> {wanted!r}")
            train.precision = wanted
    raw[bf16_key] = {**block, "enabled": train.precision != "fp32"}
    if train.precision != "fp32" and "communication_data_type" not in raw:  # reduce gradients in fp32 by default
        raw["communication_data_type"] = train.reduce_dtype

    # Optimizer.
    spec = raw.get("optimizer") or {}
    o = cfg.optim
    params: dict = {}
    if spec:
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or not kind.lower().startswith("distopt."):
            raise ConfigError(
                f"engine.deepspeed_config={path!r}: optimizer.type={kind!r}: the training job trains distopt optimizers; "
                "name one as \"distopt.<name>\" (distopt.adamw for AdamW), or leave \"optimizer\" out to use optim.*"
            )
        params = dict(spec.get("params") or {})
        name = kind[len("distopt."):].lower().replace("_", "-")
        if name != o.name:
            if _explicit(cfg, "optim.name"):
                merge.notes.append(f"optim.name={o.name!r} from the command line replaces optimizer.type={kind!r} of "
                                   f"{merge.source}; its optimizer.params are not used")
                params = {}
            else:
                merge.notes.append(f"{merge.source} sets optimizer.type={kind!r}: optim.name {o.name!r} -> {name!r} "
                                   f"(optim.hparams {o.hparams or {}} of the run config are not used)")
                o.name = name
                o.hparams = {k: v for k, v in o.hparams.items() if _explicit(cfg, f"optim.hparams.{k}")}
    for key, cast in (("lr", float), ("weight_decay", float), ("eps", float)):
        merge.pick(f"optim.{key}", getattr(o, key), params.pop(key, None), f"optimizer.params.{key}", setter(o, key, cast))
    merge.pick("optim.betas", list(o.betas), params.pop("betas", None), "optimizer.params.betas", setter(o, "betas", list))
    extra = dict(params.pop("elementwise", None) or {})
    merge.pick("optim.elementwise_lr", o.elementwise_lr, extra.pop("lr", None), "optimizer.params.elementwise.lr",
               setter(o, "elementwise_lr", float))
    routing = {k: params.pop(k) for k in ("rules", "use_default_rules") if k in params}
    for key, value in params.items():
        if key in o.hparams:
            merge.pick(f"optim.hparams.{key}", o.hparams[key], value, f"optimizer.params.{key}",
                       lambda v, k=key: o.hparams.__setitem__(k, v))
        elif _explicit(cfg, "optim.hparams"):
            merge.notes.append(f"optim.hparams from the command line has no {key!r}: optimizer.params.{key}={value!r} "
                               f"of {merge.source} is not used")
        else:
            o.hparams[key] = value
    kwargs = optimizer_kwargs(cfg)
    kwargs["betas"] = list(kwargs["betas"])
    if extra:
        kwargs["elementwise"] = {**extra, **kwargs.get("elementwise", {})}
    raw["optimizer"] = {"type": f"distopt.{o.name}", "params": {**kwargs, **routing}}

    # The learning rate: the JSON's scheduler, or the job's schedule.
    if "scheduler" in raw:
        given = sorted(k for k in getattr(cfg, "explicit_keys", ()) if k == "schedule" or k.startswith("schedule."))
        if given:
            merge.notes.append(f"{', '.join(given)} from the command line: the job's schedule sets the learning rate, "
                               f"not the scheduler of {merge.source}")
            raw.pop("scheduler")
        else:
            merge.notes.append(f"the scheduler of {merge.source} ({raw['scheduler'].get('type')}) sets the learning rate; "
                               "schedule.* is not used")
    raw.setdefault("steps_per_print", 10**9)
    return raw, merge.notes


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
