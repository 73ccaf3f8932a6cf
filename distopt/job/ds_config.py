"""The DeepSpeed config of a ZeRO run: the JSON (``engine.deepspeed_config``) merged with the run
config, precedence run config file < DeepSpeed JSON < command line, one function per concern, each
returning its notes."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, RunConfig, optimizer_kwargs
from .dist import DistInfo


def _explicit(cfg: RunConfig, key: str) -> bool:
    """Whether ``key`` (or a section holding it) was set on the command line."""
    given: frozenset[str] = getattr(cfg, "explicit_keys", frozenset())
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

    def __init__(self, cfg: RunConfig, source: str, path: str):
        self.notes: list[str]
        self.cfg, self.source, self.path, self.notes = cfg, source, path, []

    def begin(self) -> list[str]:
        """A fresh list for one concern's notes; :meth:`pick` appends to it."""
        self.notes = []
        return self.notes

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
    what DeepSpeed runs, and every difference is reported. One function per concern below: the
    ZeRO stage, the batch, the precision, the optimizer and the learning-rate schedule.
    """
    path = cfg.engine.deepspeed_config
    raw = read_deepspeed_json(path) if path else {}
    merge = _Merge(cfg, f"engine.deepspeed_config ({Path(path).name})" if path else "", path)
    notes: list[str] = []
    for concern in (_zero_stage, _batch, _precision, _optimizer, _scheduler):
        notes += concern(raw, merge, info, stage)
    raw.setdefault("steps_per_print", 10**9)
    return raw, notes


def _zero_stage(raw: dict, merge: _Merge, info: DistInfo, stage: int) -> list[str]:
    """engine.name=auto took the stage from the JSON; an explicit name must agree with it."""
    zero = dict(raw.get("zero_optimization") or {})
    if "stage" in zero and int(zero["stage"]) != stage:
        raise ConfigError(
            f"engine.name=zero{stage} but engine.deepspeed_config={merge.path!r} has zero_optimization.stage={zero['stage']}: "
            "make them agree, or set engine.name=auto to take the stage from the JSON"
        )
    zero["stage"] = stage
    raw["zero_optimization"] = zero
    return []


def _setter(section, name, kind):
    return lambda value: setattr(section, name, kind(value))


def _batch(raw: dict, merge: _Merge, info: DistInfo, stage: int) -> list[str]:
    """``train_micro_batch_size_per_gpu`` = train.batch_size, ``gradient_accumulation_steps`` =
    train.grad_accum, ``gradient_clipping`` = train.clip_grad_norm; a JSON ``train_batch_size`` must
    be micro x accumulation x ranks."""
    train, path, notes = merge.cfg.train, merge.path, merge.begin()
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
                       "train_micro_batch_size_per_gpu", _setter(train, "batch_size", int))
    accum = merge.pick("train.grad_accum", train.grad_accum, raw.get("gradient_accumulation_steps"),
                       "gradient_accumulation_steps", _setter(train, "grad_accum", int))
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
                                                "gradient_clipping", _setter(train, "clip_grad_norm", float)))
    return notes


def _precision(raw: dict, merge: _Merge, info: DistInfo, stage: int) -> list[str]:
    """``bf16.enabled`` = train.precision != fp32 (DeepSpeed's bf16, with fp32 master partitions, stands
    for both bf16 and bf16-mixed); gradients are reduced in fp32 unless the JSON says otherwise."""
    cfg, train, notes = merge.cfg, merge.cfg.train, merge.begin()
    bf16_key = "bfloat16" if "bfloat16" in raw and "bf16" not in raw else "bf16"
    block = typing.cast(dict, raw.get(bf16_key)) if isinstance(raw.get(bf16_key), dict) else {}
    theirs = block.get("enabled")
    if isinstance(theirs, bool) and theirs != (train.precision != "fp32"):  # "auto" or absent: the run config decides
        if _explicit(cfg, "train.precision"):
            notes.append(f"train.precision={train.precision!r} from the command line replaces {bf16_key}.enabled="
                         f"{str(theirs).lower()} of {merge.source}")
        else:
            wanted = "bf16-mixed" if theirs else "fp32"
            notes.append(f"{merge.source} sets {bf16_key}.enabled={str(theirs).lower()}: train.precision "
                         f"{train.precision!r} -> {wanted!r}")
            train.precision = wanted
    raw[bf16_key] = {**block, "enabled": train.precision != "fp32"}
    if train.precision != "fp32" and "communication_data_type" not in raw:  # reduce gradients in fp32 by default
        raw["communication_data_type"] = train.reduce_dtype
    return notes


def _optimizer(raw: dict, merge: _Merge, info: DistInfo, stage: int) -> list[str]:
    """``optimizer`` = ``distopt.<optim.name>`` with the ``optim`` section as ``params`` (``hparams``
    flattened, ``elementwise_lr`` as ``elementwise.lr``)."""
    cfg, path, notes = merge.cfg, merge.path, merge.begin()
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
                notes.append(f"optim.name={o.name!r} from the command line replaces optimizer.type={kind!r} of "
                             f"{merge.source}; its optimizer.params are not used")
                params = {}
            else:
                notes.append(f"{merge.source} sets optimizer.type={kind!r}: optim.name {o.name!r} -> {name!r} "
                             f"(optim.hparams {o.hparams or {}} of the run config are not used)")
                o.name = name
                o.hparams = {k: v for k, v in o.hparams.items() if _explicit(cfg, f"optim.hparams.{k}")}
    for key, cast in (("lr", float), ("weight_decay", float), ("eps", float)):
        merge.pick(f"optim.{key}", getattr(o, key), params.pop(key, None), f"optimizer.params.{key}", _setter(o, key, cast))
    merge.pick("optim.betas", list(o.betas), params.pop("betas", None), "optimizer.params.betas", _setter(o, "betas", list))
    extra = dict(params.pop("elementwise", None) or {})
    merge.pick("optim.elementwise_lr", o.elementwise_lr, extra.pop("lr", None), "optimizer.params.elementwise.lr",
               _setter(o, "elementwise_lr", float))
    routing = {k: params.pop(k) for k in ("rules", "use_default_rules") if k in params}
    for key, value in params.items():
        if key in o.hparams:
            merge.pick(f"optim.hparams.{key}", o.hparams[key], value, f"optimizer.params.{key}",
                       typing.cast("Callable[[object], None]", lambda v, k=key: o.hparams.__setitem__(k, v)))
        elif _explicit(cfg, "optim.hparams"):
            notes.append(f"optim.hparams from the command line has no {key!r}: optimizer.params.{key}={value!r} "
                         f"of {merge.source} is not used")
        else:
            o.hparams[key] = value
    kwargs = optimizer_kwargs(cfg)
    kwargs["betas"] = list(kwargs["betas"])
    if extra:
        kwargs["elementwise"] = {**extra, **kwargs.get("elementwise", {})}
    raw["optimizer"] = {"type": f"distopt.{o.name}", "params": {**kwargs, **routing}}
    return notes


def _scheduler(raw: dict, merge: _Merge, info: DistInfo, stage: int) -> list[str]:
    """A JSON ``scheduler`` sets the learning rate and replaces ``schedule.*``, unless a schedule key is
    given on the command line, which drops the JSON's scheduler."""
    if "scheduler" not in raw:
        return []
    given = sorted(k for k in getattr(merge.cfg, "explicit_keys", ()) if k == "schedule" or k.startswith("schedule."))
    if given:
        raw.pop("scheduler")
        return [f"{', '.join(given)} from the command line: the job's schedule sets the learning rate, "
                f"not the scheduler of {merge.source}"]
    return [f"the scheduler of {merge.source} ({raw['scheduler'].get('type')}) sets the learning rate; "
            "schedule.* is not used"]
