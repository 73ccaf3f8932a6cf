"""``distopt train``: pretrain a LLaMA model with a distopt optimizer.

Run it directly, under torchrun, the DeepSpeed launcher, srun or mpirun::

    distopt train --config configs/runs/tiny_cpu.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/runs/tiny_cpu.yaml --train.steps 200
    python -m distopt.job.train --config configs/runs/tiny_cpu.yaml optim.name=adamw

Everything is checked before any work: the config keys and values, the model YAML, the engine
for this launch, and the optimizer's hyper-parameters (the optimizer is built once on a
``meta``-device model, which allocates nothing).
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # `python launch/train.py`, `torchrun launch/train.py`, `deepspeed launch/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

import distopt
from distopt.job import checkpoint as ckpt
from distopt.job import dist
from distopt.job import engines as engine_registry
from distopt.job.config import ConfigError, RunConfig, describe_keys, load_config
from distopt.job.data import build_tokenizer
from distopt.job.metrics import (
    human_bytes,
)
from distopt.job.modeling import build_model, load_shape, resolve_impl
from distopt.job.trainer import CheckpointWriteError, Plan, Result, Trainer, build_optimizer, check_resume_point, fall_back

logger = logging.getLogger("distopt.train")

USAGE = """usage: distopt train [--config RUN.yaml] [--key value | key=value ...]

Pretrain a LLaMA model (configs/models/) with a distopt optimizer.

  --config PATH      a run config (a path, or a name under configs/runs/, e.g. tiny_cpu)
  --key value        override any config key: --train.steps 200, optim.hparams.rank=64,
                     --lr 3e-3 (a leaf name alone works where it is unique)
  --resume           continue from the latest checkpoint in out_dir (same as checkpoint.resume=auto)
  --help-config      list every key with its default and meaning

Launch on several processes with torchrun, the DeepSpeed launcher, srun or mpirun; the rank is
found from the launcher's environment. Exit codes: 0 done, 2 invalid configuration, 143 stopped
by SIGTERM after writing a checkpoint.
"""

EXIT_PREEMPTED = 143
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_FAILED = 4


def meta_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors and of the projections it keeps in the model (RSO's),
    as ``distopt.state_bytes`` counts them; works on the meta device, where storages have no address."""
    seen = {}
    held = optimizer.projections_in_model()
    for value in [v for state in optimizer.state.values() for v in state.values()] + list(held.values()):
        if isinstance(value, torch.Tensor):
            seen[id(value)] = value.numel() * value.element_size()
    return sum(seen.values())


def preflight(cfg: RunConfig, info: dist.DistInfo) -> Plan:
    """Every check that needs no data, no process group and no memory. Raises ConfigError.

    The engine's check may settle values of ``cfg`` (a DeepSpeed JSON config's); the notes say which."""
    notes: list[str] = []
    engine_cls = engine_registry.resolve(cfg, info, notes)
    shape = load_shape(cfg.model.name)
    impl = resolve_impl(cfg.model.impl)
    problems = []
    if cfg.data.seq_len > shape.max_position_embeddings:
        problems.append(f"data.seq_len={cfg.data.seq_len}: above the model's max_position_embeddings={shape.max_position_embeddings}")
    if cfg.optim.name not in distopt.list_optimizers():
        problems.append(f"optim.name={cfg.optim.name!r}: must be one of {', '.join(distopt.list_optimizers())}")
    if problems:
        raise ConfigError(problems)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    except Exception as err:  # a broken tokenizer folder
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: cannot be loaded: {err}") from None
    if tokenizer.vocab_size > shape.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids but model {cfg.model.name!r} "
            f"has vocab_size={shape.vocab_size}; pick a model config with a vocabulary at least that large"
        )
    with torch.device("meta"):
        model = build_model(shape, impl, activation_checkpointing=cfg.model.activation_checkpointing)
    # The model's size and AdamW's state on it, before an optimizer may rewrite it (RSO swaps its
    # linears for frozen weights plus trainable factors).
    num_params = sum(p.numel() for p in model.parameters())
    reference = distopt.build_optimizer(model, "adamw")
    reference.allocate_state()
    adamw = meta_state_bytes(reference)
    del reference
    try:
        optimizer = build_optimizer(cfg, model)
        optimizer.allocate_state()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim (name={cfg.optim.name!r}, hparams={cfg.optim.hparams}): {err}") from None
    state = meta_state_bytes(optimizer)
    matrix = sum(p.numel() for g in optimizer.param_groups if g.get("kind") == "matrix" for p in g["params"])
    del model, optimizer

    out_dir = cfg.output_dir
    root = out_dir / "checkpoints"
    resume_from, fallbacks = None, []
    if cfg.checkpoint.resume == "auto":
        found = ckpt.candidates(root, notes)
        if not found:
            notes.append(f"no checkpoint in {root} yet: starting fresh")
        else:
            resume_from, fallbacks = found[0], ([] if cfg.checkpoint.strict else found[1:])
    elif cfg.checkpoint.resume:
        resume_from = Path(cfg.checkpoint.resume)
        if not (resume_from / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: not a complete checkpoint (no meta.json)")
    elif ckpt.latest(root) is not None and not cfg.overwrite:
        raise ConfigError(
            f"out_dir={str(out_dir)!r} already holds checkpoints (latest: {cast(Path, ckpt.latest(root)).name}). "
            "Continue that run with --resume, start over with --overwrite (deletes them), or set another --out_dir"
        )
    check_output_paths(out_dir, checkpoint_bytes=num_params * 4 + state + (1 << 20))
    while resume_from is not None:  # cheap checks here; every byte is verified once the ranks are up
        try:
            ckpt.check_files(resume_from)
            check_resume_point(cfg, resume_from)
            break
        except ckpt.IntegrityError as err:
            resume_from, fallbacks = fall_back(cfg, err, fallbacks, notes.append)
    return Plan(engine_cls, shape, impl, tokenizer, num_params, matrix, state, adamw, out_dir, resume_from, notes, fallbacks)


def check_output_paths(out_dir: Path, checkpoint_bytes: int) -> None:
    """Before any data or model is loaded: ``out_dir`` and its files can be written, nothing is in
    the way, and the disk has room for a checkpoint (fp32 weights plus optimizer state). ConfigError
    names the path and the fix."""
    problems = []
    for path, kind in ((out_dir, "dir"), (out_dir / "checkpoints", "dir"), (out_dir / "metrics.jsonl", "file"),
                       (out_dir / "summary.json", "file"), (out_dir / "config.yaml", "file")):
        if kind == "dir" and path.exists() and not path.is_dir():
            problems.append(f"{path} is a file, where the job needs a folder: move it away or set another out_dir")
        if kind == "file" and path.is_dir():
            problems.append(f"{path} is a folder, where the job writes a file: move it away or set another out_dir")
    if problems:
        raise ConfigError(problems)
    base = out_dir  # the nearest folder that exists: nothing is created here
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{base} is a file, where out_dir={str(out_dir)!r} needs a folder: set another out_dir")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be written ({err.strerror or err} in {base}): set out_dir "
                          "to a writable folder") from None
    free = shutil.disk_usage(base).free
    if free < checkpoint_bytes:
        raise ConfigError(f"out_dir={str(out_dir)!r} has {human_bytes(free)} free, but one checkpoint needs about "
                          f"{human_bytes(checkpoint_bytes)} (fp32 weights and optimizer state): free space or set "
                          "another out_dir")


def run(cfg: RunConfig, info: dist.DistInfo | None = None, stream=None) -> Result:
    """Train per ``cfg``. Collective: every rank of the launch calls it."""
    info = info or dist.discover()
    plan = preflight(cfg, info)
    device = dist.pick_device(cfg.engine.device, info)
    if device.type == "cpu":
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(dist.cpu_threads(info))
    dist.init(info, device, cfg.engine.backend)
    return Trainer(cfg, info, plan, device, stream).fit()


# -- command line ---------------------------------------------------------------------------------------------
def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull out ``--config``/``-c`` (or a leading .yaml path) and the launcher's ``--local_rank``.

    DeepSpeed-style arguments are understood too: ``--deepspeed_config FILE`` (or
    ``--deepscale_config``) is ``--engine.deepspeed_config FILE``, and a bare ``--deepspeed`` is dropped."""
    config, rest = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith(("--local_rank", "--local-rank")):  # the DeepSpeed launcher adds it
            if "=" not in arg:
                i += 1
        elif arg == "--deepspeed":
            pass
        elif arg.startswith(("--deepscale_config", "--deepscale-config")):
            rest.append("--engine.deepspeed_config" + arg[len("--deepscale_config"):])
        elif config is None and not rest and not arg.startswith("-") and "=" not in arg and arg.endswith((".yaml", ".yml")):
            config = arg
        else:
            rest.append(arg)
        i += 1
    return config, rest


def _setup_logging(info: dist.DistInfo) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s [rank {info.rank}] %(message)s")
    logging.getLogger("distopt.train").setLevel(logging.INFO if info.is_main else logging.WARNING)
    logging.getLogger("distopt").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    if "--help-config" in argv:
        print(describe_keys())
        return 0
    info = dist.discover()
    _setup_logging(info)
    if not faulthandler.is_enabled():  # a rank that dies on a signal prints where its threads were
        faulthandler.enable()
    try:
        config, overrides = split_argv(argv)
        cfg = load_config(config, overrides)
        result = run(cfg, info)
    except ConfigError as err:
        if info.is_main:
            print(f"distopt train: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:
        print(f"distopt train: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    finally:
        dist.shutdown()
    if result.diverged:
        return EXIT_DIVERGED
    return EXIT_PREEMPTED if result.preempted else 0


def _live_gloo_threads() -> int:
    """Threads of torch's gloo backend still running in this process (Linux; 0 elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                count += fh.read().startswith(("pt_gloo", "gloo_"))
        except OSError:
            continue
    return count


def skip_teardown_under_live_threads(code: int) -> int:
    """After :func:`main` of a multi-process run whose gloo threads outlived the process group,
    leave the process with ``code`` at once, without the interpreter's teardown; otherwise return
    ``code``. FSDP2 keeps torch's gloo process group, and its worker threads, alive past
    ``destroy_process_group`` (torch 2.13, on CPU), so the teardown would run under live
    communication threads. Finished 2-rank FSDP2 runs were seen to lose a rank there, about once in
    a few hundred: it aborted (``terminate called without an active exception``, exit -6) after its
    last collective, its peer having exited 0, and a launcher counts that as a failed job. Logs and
    standard streams are flushed and MPI (``mpirun`` with mpi4py) is finalized first."""
    if not dist.started() or not _live_gloo_threads():
        return code
    gc.collect()  # what still holds files open (in reference cycles) closes them now
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(skip_teardown_under_live_threads(main()))
