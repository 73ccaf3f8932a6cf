"""The run configuration: typed dataclasses, one YAML file, command-line overrides, validation.

A run is described by :class:`RunConfig`. It is read from a YAML file whose top-level keys are
the sections below, then changed by overrides given as ``--section.key value``,
``--section.key=value`` or ``section.key=value`` (a leaf name alone, ``--steps 100``, works where
it is unique). Every key and value is checked before any work starts; all problems are reported
together, each with the key, the value given and what is allowed.

About 550 lines, most of them field declarations with their help text: the sections are the
reference of every key, so they stay in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def config_dirs() -> list[Path]:
    """Where configs are looked up by name: $DISTOPT_CONFIG_DIR, ./configs, then the source tree's."""
    dirs = [Path(os.environ["DISTOPT_CONFIG_DIR"])] if os.environ.get("DISTOPT_CONFIG_DIR") else []
    dirs += [Path.cwd() / "configs", CONFIG_DIR]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_named(kind: str, names: list[str]) -> Path | None:
    for d in config_dirs():
        for name in names:
            if (d / kind / name).is_file():
                return d / kind / name
    return None


def known_names(kind: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / kind).glob("*.yaml")})

ENGINES = ("auto", "single", "ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
MODEL_IMPLS = ("auto", "hf", "native")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
GRAD_SYNCS = ("full", "projected")
PROGRESS = ("auto", "bar", "lines", "off")


class ConfigError(ValueError):
    """One or more invalid keys or values; the message lists each of them."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


def _f(default, help: str = "", **checks):
    """A dataclass field with a help text and checks (choices, ge, gt, le)."""
    meta = {"help": help, **checks}
    if isinstance(default, (dict, list)):
        # A fresh copy per instance; the cast is for the lambda's default argument, which mypy cannot infer.
        return field(default_factory=typing.cast("Callable[[], Any]", lambda d=default: type(d)(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("tiny", "configs/models/llama_<name>.yaml (tiny, 20m, 60m, 130m, 350m, 1b, 7b) or a path to such a YAML")
    impl: str = _f("auto", "hf: transformers.LlamaForCausalLM; native: distopt.models.TinyLlama; auto: hf when transformers is installed", choices=MODEL_IMPLS)
    activation_checkpointing: bool = _f(False, "recompute each decoder layer in the backward pass (hf only)")


@dataclass
class DataConfig:
    source: str = _f("stdlib", "stdlib (Python's standard library source, no download), a text file, a folder of text files, "
                      "or .bin token shards (a file, folder or glob)")
    glob: str = _f("", "files to read under a folder source (default **/*.txt; **/*.py for stdlib; *.bin for shards)")
    val_source: str = _f("", "separate validation data (same forms as source); default: split source by file-name hash")
    val_percent: float = _f(2.0, "percent of files (by file-name hash) held out for validation", gt=0, lt=100)
    tokenizer: str = _f("byte", "byte (256 ids), or a local Hugging Face tokenizer folder")
    seq_len: int = _f(256, "tokens per training sequence", ge=2)
    cache_dir: str = _f("", "where text tokenized by a Hugging Face tokenizer is cached (default ~/.cache/distopt)")


@dataclass
class OptimConfig:
    name: str = _f("galore", "a name from `distopt list`")
    lr: float = _f(1e-3, "peak learning rate (unset: the optimizer's default, docs/defaults.md)", ge=0)
    weight_decay: float = _f(0.0, "decoupled weight decay (unset: the optimizer's default)", ge=0)
    betas: list = _f([0.9, 0.999], "Adam betas (unset: the optimizer's default)")
    eps: float = _f(1e-8, "Adam epsilon (unset: the optimizer's default)", ge=0)
    elementwise_lr: float = _f(0.0, "learning rate of the element-wise AdamW group (embeddings, norms, LM head); 0: same as lr", ge=0)
    hparams: dict = _f({}, "algorithm-specific hyper-parameters (galore: rank, update_proj_gap, scale, refresh, stagger, ...)")


@dataclass
class ScheduleConfig:
    warmup_steps: int = _f(0, "linear warm-up steps", ge=0)
    decay: str = _f("cosine", "shape after warm-up", choices=SCHEDULES)
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of the peak", ge=0, le=1)


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps in the whole run", ge=1)
    batch_size: int = _f(8, "sequences per rank per micro-step", ge=1)
    grad_accum: int = _f(1, "micro-steps per optimizer step", ge=1)
    clip_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping, the norm is still logged)", ge=0)
    precision: str = _f("fp32", "fp32; bf16-mixed (fp32 weights, bf16 autocast); bf16 (bf16 weights, fp32 optimizer math)", choices=PRECISIONS)
    reduce_dtype: str = _f("fp32", "dtype of the gradient reduction across ranks in bf16 runs (FSDP2/HSDP reduce-scatter, "
                                   "DeepSpeed communication_data_type): fp32 (exact sums, twice the bytes of bf16) or "
                                   "bf16 (half the traffic; each sum rounds to 8 bits of mantissa)", choices=("fp32", "bf16"))
    seed: int = _f(0, "seed of the model init and the data order", ge=0)
    stop_at: int = _f(0, "stop after this step with a checkpoint, as if preempted (0: run to train.steps)", ge=0)
    max_bad_steps: int = _f(5, "stop the run as diverged (exit code 3) after this many consecutive steps whose loss or "
                               "gradient norm is not finite; no checkpoint is written of such a state (0: never stop)", ge=0)


@dataclass
class EvalConfig:
    every: int = _f(100, "evaluate every N steps, and at the start and the end (0: only at the end)", ge=0)
    batches: int = _f(8, "validation batches per rank per evaluation", ge=1)


@dataclass
class CheckpointConfig:
    every: int = _f(0, "write a checkpoint every N steps (0: only at the end and on SIGTERM)", ge=0)
    keep: int = _f(2, "checkpoints kept on the current branch; older ones are deleted (0: keep all)", ge=0)
    resume: str = _f("", "'auto' (or --resume alone): continue from the latest checkpoint in out_dir if there is one; a checkpoint folder; '' to start fresh")
    strict: bool = _f(False, "refuse to resume when the chosen checkpoint fails its integrity check, instead of falling back "
                              "(loudly) to the newest one that passes")


@dataclass
class EngineConfig:
    name: str = _f("auto", "auto (single for one process, ddp for several), single, ddp, fsdp2, hsdp, zero1, zero2, zero3", choices=ENGINES)
    device: str = _f("auto", "auto: cuda when available", choices=DEVICES)
    backend: str = _f("auto", "process-group backend; auto: nccl on cuda, gloo on cpu", choices=BACKENDS)
    threads: int = _f(0, "CPU threads per rank (0: OMP_NUM_THREADS if set, else the usable cores divided by the ranks on the node)", ge=0)
    hsdp_replicas: int = _f(0, "hsdp: number of replica groups (world size must divide by it)", ge=0)
    grad_sync: str = _f("full", "ddp, hsdp: full (the engine all-reduces every gradient across replicas) or projected (the optimizer averages the "
                                "matrices' projections and refresh sketches: the same numbers, r/d of the traffic; "
                                "projected algorithms without recovery scaling; clipping measures the synced projections)", choices=GRAD_SYNCS)
    deepspeed_config: str = _f("", "zero1/2/3 (with name=auto: zero<its zero_optimization.stage>): a DeepSpeed JSON config; "
                                   "its values win over the run config file's, command-line overrides win over it")


@dataclass
class LogConfig:
    every: int = _f(10, "steps between metric records (and progress lines when not on a terminal)", ge=1)
    progress: str = _f("auto", "auto: an in-place bar on a terminal, plain lines otherwise", choices=PROGRESS)
    plot: bool = _f(True, "write loss.png at the end (needs matplotlib)")


@dataclass
class RunConfig:
    run_name: str = _f("", "name of the run (default: <model>-<optimizer>)")
    out_dir: str = _f("", "where metrics, plots and checkpoints go (default: runs/<run_name>)")
    overwrite: bool = _f(False, "start fresh even if out_dir holds checkpoints (deletes them)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # -- derived ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_name or f"{Path(self.model.name).stem.replace('llama_', 'llama-')}-{self.optim.name}"

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("runs", self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    out: dict[str, type] = {}
    for f in dataclasses.fields(RunConfig):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = f.default_factory
    return out


SECTIONS = _sections()
_HINTS = {cls: typing.get_type_hints(cls) for cls in (RunConfig, *SECTIONS.values())}


def all_keys() -> list[str]:
    """Every settable dotted key."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


# -- value parsing ------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, typ) -> Any:
    """Turn a YAML or command-line value into ``typ``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}={value!r}: must be an integer") from None
            if isinstance(number, float) and not number.is_integer():
                raise ConfigError(f"{key}={value!r}: must be an integer")
            return int(number)
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: must be a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return number
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: must be a string")
        return str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: must be a list, e.g. [0.9, 0.95] or 0.9,0.95")
        return list(value)
    if typ is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be a mapping, e.g. {{rank: 128}}")
        return {k: _scalar_from_cli(v) if isinstance(v, str) and _NUMBER.fullmatch(v.strip()) else v for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {typ}")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar_from_cli(text: str) -> Any:
    """Values in ``hparams`` have no declared type: read them as YAML scalars (64 -> int, 0.25 -> float,
    and 5e-1 -> 0.5, which YAML 1.1 would leave a string)."""
    if _NUMBER.fullmatch(text.strip()):
        number = float(text)
        return int(number) if number.is_integer() and "." not in text else number  # 64 and 1e2 are counts
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# -- building -------------------------------------------------------------------------------------
def _apply(cfg: RunConfig, key: str, value: Any, problems: list[str], from_cli: bool, given: set | None = None) -> None:
    parts = key.split(".")
    if parts[0] in SECTIONS:
        section = getattr(cfg, parts[0])
        if len(parts) == 1:
            if not isinstance(value, dict):
                problems.append(f"{key}={value!r}: is a section; give a mapping or set {key}.<key>")
                return
            for sub, v in value.items():
                _apply(cfg, f"{key}.{sub}", v, problems, from_cli, given)
            return
        name = parts[1]
        hints = _HINTS[type(section)]
        if name not in hints:
            problems.append(f"unknown key {key!r}.{_suggest(key, all_keys())} Keys of [{parts[0]}]: {', '.join(hints)}")
            return
        if len(parts) > 2:
            if hints[name] is not dict:
                problems.append(f"unknown key {key!r}: {parts[0]}.{name} has no sub-keys")
                return
            target = getattr(section, name)
            for sub in parts[2:-1]:
                target = target.setdefault(sub, {})
                if not isinstance(target, dict):
                    problems.append(f"{key}: {sub} is not a mapping")
                    return
            # YAML 1.1 reads 5e-1 (no dot) as a string: numbers in hparams are read as numbers either way.
            target[parts[-1]] = _scalar_from_cli(value) if isinstance(value, str) and (from_cli or _NUMBER.fullmatch(value)) else value
            return
        try:
            coerced = _coerce(key, value, hints[name])
        except ConfigError as err:
            problems.extend(err.problems)
            return
        setattr(section, name, coerced)
        if given is not None:
            given.add(key)
        return
    hints = _HINTS[RunConfig]
    if len(parts) == 1 and key in hints and key not in SECTIONS:
        try:
            setattr(cfg, key, _coerce(key, value, hints[key]))
        except ConfigError as err:
            problems.extend(err.problems)
        return
    problems.append(f"unknown key {key!r}.{_suggest(key, all_keys())} Sections: {', '.join(SECTIONS)}")


def resolve_alias(key: str) -> tuple[str, str | None]:
    """``steps`` -> ``train.steps`` when exactly one section has that key. Returns (key, problem)."""
    if "." in key or key in _HINTS[RunConfig]:
        return key, None
    owners = [s for s, cls in SECTIONS.items() if key in _HINTS[cls]]
    if len(owners) == 1:
        return f"{owners[0]}.{key}", None
    if len(owners) > 1:
        return key, f"{key!r} is ambiguous: say which, one of {', '.join(f'{s}.{key}' for s in owners)}"
    leaves = {k.split(".")[-1]: k for k in all_keys()}
    close = difflib.get_close_matches(key, list(leaves), n=1)
    hint = f" Did you mean {leaves[close[0]]!r}?" if close else ""
    return key, f"unknown key {key!r}.{hint} `distopt train --help-config` lists every key"


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b 1``, ``--a.b=1``, ``a.b=1``; a ``--flag`` with no value means ``true``."""
    pairs, problems = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                i += 1
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 2
            else:
                key, value = body, "true"
                i += 1
        elif "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        else:
            problems.append(f"unexpected argument {arg!r}: give overrides as --key value or key=value")
            i += 1
            continue
        pairs.append((key.strip().replace("-", "_"), value))
    if problems:
        raise ConfigError(problems)
    return pairs


def find_config(name: str) -> Path:
    """A run config by path, or by name under configs/runs/."""
    path = Path(name)
    if path.is_file():
        return path
    found = find_named("runs", [name, f"{name}.yaml"])
    if found:
        return found
    where = ", ".join(str(d / "runs") for d in config_dirs()) or "no configs folder found"
    raise ConfigError(f"config={name!r}: no such file (known run configs: {', '.join(known_names('runs'))}; looked in {where})")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | Sequence[tuple[str, str]] = ()) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; validated. Raises :class:`ConfigError`."""
    cfg = RunConfig()
    problems: list[str] = []
    given: set[str] = set()  # keys the file or the overrides set
    if path:
        file = find_config(str(path))
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        for key, value in data.items():
            _apply(cfg, str(key), value, problems, from_cli=False, given=given)
    # "key=value" strings when the first one is a string, else (key, value) pairs.
    pairs = parse_overrides(list(typing.cast("Sequence[str]", overrides))) if overrides and isinstance(next(iter(overrides)), str) else list(overrides)
    explicit: set[str] = set()
    for key, value in pairs:
        key, problem = resolve_alias(key)
        if problem:
            problems.append(problem)
            continue
        explicit.add(key)
        if key == "checkpoint.resume" and str(value).lower() in _TRUE:
            value = "auto"
        _apply(cfg, key, value, problems, from_cli=True, given=given)
    _fill_optimizer_defaults(cfg, given)
    try:
        validate(cfg)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    # Keys given as overrides: they win over an engine's own config file (engine.deepspeed_config).
    cfg.explicit_keys = frozenset(explicit)  # type: ignore[attr-defined]  # not a field: read back with getattr
    return cfg


# optim.* keys that, when not set, take the chosen optimizer's own default (docs/defaults.md).
OPTIMIZER_DEFAULT_KEYS = ("lr", "weight_decay", "betas", "eps")


def _fill_optimizer_defaults(cfg: RunConfig, given: set[str]) -> None:
    """Unset ``optim.lr``/``weight_decay``/``betas``/``eps`` take the optimizer's own defaults (the
    paper's, e.g. AdaPM's betas (0.9, 0.95) and weight decay 0.1), not one set shared by all."""
    from distopt.optim import REGISTRY  # here, so that reading a config does not import torch up front

    cls = REGISTRY.get(cfg.optim.name)
    if cls is None:  # an unknown name is reported by the job's checks, with suggestions
        return
    parameters = inspect.signature(cls.__init__).parameters
    for key in OPTIMIZER_DEFAULT_KEYS:
        if f"optim.{key}" not in given and key in parameters:
            default = parameters[key].default
            setattr(cfg.optim, key, list(default) if key == "betas" else default)


def validate(cfg: RunConfig) -> None:
    """Field checks (choices and ranges), then the checks that involve several fields."""
    problems = []
    for section_name, section in [("", cfg)] + [(s, getattr(cfg, s)) for s in SECTIONS]:
        for f in dataclasses.fields(section):
            if section is cfg and f.name in SECTIONS:
                continue
            key = f"{section_name}.{f.name}" if section_name else f.name
            value = getattr(section, f.name)
            meta = f.metadata
            if "choices" in meta and value not in meta["choices"]:
                problems.append(f"{key}={value!r}: must be one of {', '.join(meta['choices'])}.{_suggest(str(value), meta['choices'])}")
            if "ge" in meta and value < meta["ge"]:
                problems.append(f"{key}={value!r}: must be >= {meta['ge']}")
            if "gt" in meta and value <= meta["gt"]:
                problems.append(f"{key}={value!r}: must be > {meta['gt']}")
            if "le" in meta and value > meta["le"]:
                problems.append(f"{key}={value!r}: must be <= {meta['le']}")
            if "lt" in meta and value >= meta["lt"]:
                problems.append(f"{key}={value!r}: must be < {meta['lt']}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        problems.append(f"optim.betas={betas!r}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if cfg.train.stop_at and cfg.train.stop_at >= cfg.train.steps:
        problems.append(f"train.stop_at={cfg.train.stop_at}: must be below train.steps={cfg.train.steps} (or 0)")
    if cfg.schedule.warmup_steps >= cfg.train.steps and cfg.train.steps > 1:
        problems.append(f"schedule.warmup_steps={cfg.schedule.warmup_steps}: must be below train.steps={cfg.train.steps}")
    if cfg.engine.deepspeed_config:
        if cfg.engine.name not in ("auto", "zero1", "zero2", "zero3"):
            problems.append(f"engine.deepspeed_config={cfg.engine.deepspeed_config!r}: only the zero1/zero2/zero3 engines read it "
                            f"(or auto, which then takes the ZeRO stage from it), not engine.name={cfg.engine.name}")
        elif not Path(cfg.engine.deepspeed_config).is_file():
            problems.append(f"engine.deepspeed_config={cfg.engine.deepspeed_config!r}: no such file")
    if cfg.engine.name == "hsdp" and cfg.engine.hsdp_replicas < 1:
        problems.append("engine.hsdp_replicas=0: hsdp needs the number of replica groups (>= 1)")
    if cfg.engine.device == "cpu" and cfg.engine.backend == "nccl":
        problems.append("engine.backend='nccl': needs engine.device=cuda (use gloo on cpu)")
    resume = cfg.checkpoint.resume
    if resume and resume != "auto" and not Path(resume).is_dir():
        problems.append(f"checkpoint.resume={resume!r}: must be 'auto' or an existing checkpoint folder")
    if cfg.data.tokenizer != "byte" and not Path(cfg.data.tokenizer).is_dir():
        problems.append(f"data.tokenizer={cfg.data.tokenizer!r}: must be 'byte' or a local Hugging Face tokenizer folder (no downloads)")
    for key in ("source", "val_source"):
        value = getattr(cfg.data, key)
        if value and value != "stdlib" and not _exists(value):
            problems.append(f"data.{key}={value!r}: no such file, folder or glob match (or 'stdlib')")
    if problems:
        raise ConfigError(problems)


def _exists(spec: str) -> bool:
    path = Path(spec)
    if path.exists():
        return True
    import glob as _glob

    return bool(_glob.glob(spec, recursive=True))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_keys() -> str:
    """A help listing of every key with its default and meaning."""
    lines = []
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            continue
        lines.append(f"  {f.name:<32} {getattr(defaults, f.name)!r:<12} {f.metadata.get('help', '')}")
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            lines.append(f"  {section + '.' + f.name:<32} {default!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def optimizer_kwargs(cfg: RunConfig) -> dict:
    """Keyword arguments of ``distopt.build_optimizer`` from the ``optim`` section."""
    o = cfg.optim
    kwargs = dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, **o.hparams)
    if o.elementwise_lr:
        kwargs["elementwise"] = {"lr": o.elementwise_lr}
    return kwargs
