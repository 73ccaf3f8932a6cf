"""The training loop of ``distopt train``: a :class:`Trainer` holds one run on this rank (data, model in
its engine, optimizer, position in the data) and runs it; ``train.py`` checks the launch first and
hands it over."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as torch_dist

import distopt
from distopt.job import checkpoint as ckpt
from distopt.job import dist
from distopt.job.config import ConfigError, RunConfig, dump_config, optimizer_kwargs
from distopt.job.data import ByteTokenizer, HFTokenizer, Sampler, load_datasets
from distopt.job.metrics import (
    PLOT_HINT,
    JsonlLog,
    Progress,
    human_bytes,
    human_count,
    human_time,
    peak_memory,
    plot_runs,
    read_jsonl,
    summary_table,
    write_json_atomic,
)
from distopt.job.modeling import ModelShape, build_model, lm_loss

if TYPE_CHECKING:
    from distopt.job.engines.base import Engine

logger = logging.getLogger("distopt.train")


@dataclass
class Plan:
    engine_cls: type[Engine]
    shape: ModelShape
    impl: str
    tokenizer: ByteTokenizer | HFTokenizer
    num_params: int
    matrix_params: int
    state_bytes: int
    adamw_state_bytes: int
    out_dir: Path
    resume_from: Path | None
    notes: list[str] = field(default_factory=list)
    # Older complete checkpoints to fall back to, newest first, when resume_from fails verification.
    fallbacks: list[Path] = field(default_factory=list)


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions): the job stops, the last one stays."""


# -- checks before any work -------------------------------------------------------------------------
def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> distopt.SubspaceOptimizer:
    kwargs = optimizer_kwargs(cfg)
    elementwise = kwargs.pop("elementwise", None)
    return distopt.build_optimizer(model, cfg.optim.name, elementwise=elementwise, **kwargs)


def check_resume_point(cfg: RunConfig, path: Path, saved: dict | None = None) -> None:
    """Refuse (ConfigError) checkpoint ``path`` when its trainer state (read here unless given) was
    written for another optimizer, model or sequence length; :class:`ckpt.IntegrityError` when it
    cannot be read."""
    saved = ckpt.read_file(path / "trainer.pt") if saved is None else saved
    wanted = {"optim.name": (saved["optimizer"], cfg.optim.name), "data.seq_len": (saved["seq_len"], cfg.data.seq_len),
              "model.name": (saved["model"], cfg.model.name)}
    differ = [f"{k}={old!r}" for k, (old, new) in wanted.items() if old != new]
    if differ:
        raise ConfigError(f"{path} was written with {', '.join(differ)}; resume it with the same values")


def fall_back(cfg: RunConfig, err: Exception, fallbacks: list[Path], say: Callable[[str], None]) -> tuple[Path, list[Path]]:
    """The next checkpoint to try after ``err``, announced loudly; ConfigError when there is none or
    ``checkpoint.strict`` (or an explicitly named checkpoint) forbids falling back."""
    if not fallbacks:
        hint = ("" if cfg.checkpoint.strict or cfg.checkpoint.resume != "auto" else
                " and no older complete checkpoint passes either")
        raise ConfigError(f"cannot resume: {err}{hint}. Resume another checkpoint with checkpoint.resume=<folder>, "
                          "or start over with --overwrite")
    say(f"WARNING: cannot resume: {err}. Falling back to {fallbacks[0]}")
    return fallbacks[0], fallbacks[1:]


@dataclass
class Result:
    out_dir: Path
    steps_done: int
    preempted: bool
    summary: dict
    diverged: bool = False


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of the peak lr for the update that makes step ``step + 1``."""
    s, total = cfg.schedule, cfg.train.steps
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return 1.0
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    if s.decay == "linear":
        return 1.0 - (1.0 - s.min_lr_ratio) * progress
    return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(cfg: RunConfig, device: torch.device, engine=None):
    if cfg.train.precision == "bf16-mixed" and not (engine is not None and engine.owns_precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(engine, stream, cfg: RunConfig, info: dist.DistInfo, device: torch.device) -> float:
    """Mean next-token loss over a fixed slice of the validation windows (the same every time)."""
    model = engine.model
    was_training = model.training
    model.eval()
    b = cfg.train.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), _autocast(cfg, device, engine):
        for i in range(cfg.eval.batches):
            first = (i * info.world_size + info.rank) * b
            window = torch.stack([torch.from_numpy(stream.window(first + j)) for j in range(b)]).to(device)
            total[0] += lm_loss(model, window, reduction="sum").double()
            total[1] += window[:, 1:].numel()
    if torch_dist.is_initialized():
        torch_dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


class Trainer:
    """One training run on this rank: the data, the model in its engine, the optimizer and the
    position in the data. :meth:`fit` runs the loop; :meth:`train_step`, :meth:`evaluate`,
    :meth:`save` and :meth:`summary` are its parts. Collective: every rank builds one."""

    def __init__(self, cfg: RunConfig, info: dist.DistInfo, plan: Plan, device: torch.device, stream):
        self.cfg, self.info, self.plan, self.device = cfg, info, plan, device
        self.main = info.is_main
        self.out_dir, self.root = plan.out_dir, plan.out_dir / "checkpoints"
        self.resuming = plan.resume_from is not None
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self.resuming and cfg.overwrite and self.root.exists():
                shutil.rmtree(self.root)
            (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        dist.barrier()
        self.progress = Progress(cfg.train.steps, 0, cfg.log.progress, cfg.log.every, self.main, stream)
        self.say = self.progress.message
        for note in plan.notes:
            self.say(note)
        self.data = self._load_data()
        self.engine = self._build_engine()
        self.optimizer = self.engine.optimizer
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.micro, self.accum, self.world, self.seq = cfg.train.batch_size, cfg.train.grad_accum, info.world_size, cfg.data.seq_len
        self.samples_per_step = self.micro * self.accum * self.world
        self.tokens_per_step = self.samples_per_step * self.seq
        self.step, self.consumed, self.elapsed_before, self.best_val = 0, 0, 0.0, math.inf
        self.resume_from = plan.resume_from
        self.eval_history: list[tuple[int, float]] = []
        self.train_losses: list[float] = []
        self.step_times: list[float] = []
        self.last_ckpt: Path | None = None
        self.state_now = 0
        # Set by fit(), which calls train_step() and evaluate().
        self.preempt: ckpt.Preemption | None = None
        self.metrics: JsonlLog | None = None

    # -- setup -------------------------------------------------------------------------------------
    def _load_data(self):
        """The datasets; rank 0 goes first so that a tokenizer cache is written once."""
        if not self.main:
            dist.barrier()
        try:
            data = load_datasets(self.cfg, self.plan.tokenizer)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        finally:
            if self.main:
                dist.barrier()
        top = data.train.max_token()
        if top >= self.plan.shape.vocab_size:
            raise ConfigError(f"data.source holds token id {top}, outside the model's vocab_size={self.plan.shape.vocab_size}")
        return data

    def _build_engine(self):
        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.train.seed)
        model = build_model(plan.shape, plan.impl, activation_checkpointing=cfg.model.activation_checkpointing)
        # Parameters only: buffers such as RoPE frequencies stay fp32. DeepSpeed casts (and keeps fp32 masters) itself.
        if cfg.train.precision == "bf16" and not plan.engine_cls.owns_precision:
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        engine = plan.engine_cls(cfg, self.info, self.device)
        engine.setup(model, lambda m: build_optimizer(cfg, m))
        return engine

    def resume(self) -> None:
        """Load the checkpoint to resume from (every file's CRC checked over all ranks before anything
        is applied), falling back to older ones where one fails its check."""
        if not self.resuming:
            return
        # Resuming: resume_from is set.
        cfg, resume_from, fallbacks = self.cfg, cast(Path, self.plan.resume_from), list(self.plan.fallbacks)
        while True:
            try:
                trainer = ckpt.load(resume_from, self.info, self.engine)
                check_resume_point(cfg, resume_from, trainer)
                break
            except ckpt.IntegrityError as err:
                resume_from, fallbacks = fall_back(cfg, err, fallbacks, self.say)
            except ValueError as err:  # shapes or hyper-parameters that fix state shapes differ
                raise ConfigError(f"cannot resume from {resume_from}: {err}") from None
        if trainer["samples_per_step"] != self.samples_per_step and self.main:
            logger.warning("global batch changed from %d to %d sequences: the data order now differs from an uninterrupted run",
                           trainer["samples_per_step"], self.samples_per_step)
        self.step, self.consumed = int(trainer["step"]), int(trainer["samples_consumed"])
        self.elapsed_before, self.best_val = float(trainer.get("train_seconds", 0.0)), float(trainer.get("best_val", math.inf))
        self.resume_from = resume_from
        self.say(f"resumed from {resume_from} at step {self.step}")
        for change in getattr(self.optimizer, "resumed_changes", []):
            self.say(f"resume: {change}")
        if self.main:  # a rollback starts a new branch: later checkpoints are kept aside, never deleted
            aside = ckpt.start_branch(self.root, resume_from, self.step)
            if aside is not None:
                self.say(f"checkpoints after step {self.step} (the run being rolled back) moved to {aside}")
        dist.barrier()

    def _banner(self) -> str:
        cfg, plan = self.cfg, self.plan
        return summary_table([
            ("run", f"{cfg.name} -> {self.out_dir}"),
            ("model", f"{Path(cfg.model.name).stem} ({'transformers LlamaForCausalLM' if plan.impl == 'hf' else 'distopt TinyLlama'}), "
                      f"{human_count(plan.num_params)} parameters"),
            ("data", f"{self.data.description}; {plan.tokenizer.name} tokenizer"),
            ("engine", f"{self.engine.describe()}, {cfg.train.precision}"),
            ("optimizer", f"{cfg.optim.name} lr {cfg.optim.lr:g} {cfg.optim.hparams or ''} state {human_bytes(plan.state_bytes)} "
                          f"(AdamW: {human_bytes(plan.adamw_state_bytes)})"),
            ("batch", f"{self.world} x {self.micro} x {self.accum} seqs x {self.seq} tokens = {human_count(self.tokens_per_step)} "
                      f"tokens/step; {cfg.train.steps} steps = {human_count(self.tokens_per_step * cfg.train.steps)} tokens"),
        ], "distopt train")

    # -- the parts of the loop ------------------------------------------------------------------------
    def evaluate(self, at: int) -> float:
        """Validation loss at step ``at``, recorded in the metrics and the progress line."""
        val = evaluate(self.engine, self.data.val, self.cfg, self.info, self.device)
        self.best_val = min(self.best_val, val)
        self.eval_history.append((at, val))
        self.progress.val = val
        cast(JsonlLog, self.metrics).write({"kind": "eval", "step": at, "val_loss": val, "tokens": at * self.tokens_per_step})
        if self.progress.mode == "lines":
            self.say(f"eval step {at}: val loss {val:.4f}")
        return val

    def save(self, at: int) -> Path:
        """A checkpoint of step ``at``: the engine's state and where the run stands in the data."""
        trainer_state = {
            "step": at, "samples_consumed": self.consumed, "samples_per_step": self.samples_per_step, "seq_len": self.seq,
            "optimizer": self.cfg.optim.name, "model": self.cfg.model.name, "base_lrs": self.base_lrs, "world_size": self.world,
            "train_seconds": self.elapsed_before + sum(self.step_times), "best_val": self.best_val,
        }
        started = time.perf_counter()
        try:
            path = ckpt.save(self.root, at, self.info, self.engine, trainer_state, self.config_text, self.cfg.checkpoint.keep)
        except OSError as err:
            raise CheckpointWriteError(
                f"could not write checkpoint step {at} under {self.root}: {err}. The last complete checkpoint, "
                f"{self.last_ckpt or ckpt.latest(self.root) or 'none'}, is untouched; free space (or fix the folder) and "
                "resume with --resume") from None
        if self.progress.mode == "lines":
            self.say(f"checkpoint {path} ({time.perf_counter() - started:.1f}s)")
        return path

    def train_step(self) -> tuple[float, float | None, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches: ``(loss, gradient norm, lr, stop signal)``,
        the loss averaged over the ranks and the signal true where any rank was asked to stop."""
        cfg, engine, device, info = self.cfg, self.engine, self.device, self.info
        factor = lr_factor(self.step, cfg)
        if not engine.schedules_lr:  # else the engine's scheduler (DeepSpeed's, from its JSON) sets it
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
        lr_now = engine.current_lr() if engine.schedules_lr else cfg.optim.lr * factor
        loss_sum = torch.zeros((), device=device)
        for m in range(self.accum):
            first = self.consumed + (m * self.world + info.rank) * self.micro
            window = self.sampler.batch(first, self.micro).to(device, non_blocking=True)
            with engine.accumulating(m == self.accum - 1):
                with _autocast(cfg, device, engine):
                    loss = lm_loss(engine.model, window) / self.accum
                engine.backward(loss)
            loss_sum += loss.detach()
        grad_norm = engine.clip_grad_norm(cfg.train.clip_grad_norm)
        engine.step()
        if grad_norm is None:  # the engine clips inside its step (DeepSpeed)
            grad_norm = engine.last_grad_norm()
        self.step += 1
        self.consumed += self.samples_per_step
        # One all-reduce per step: the loss for the log, and whether any rank was signalled.
        shared = torch.stack([loss_sum.float(), torch.tensor(float(cast(ckpt.Preemption, self.preempt).requested), device=device)])
        if torch_dist.is_initialized():
            torch_dist.all_reduce(shared)
        return float(shared[0]) / self.world, grad_norm, lr_now, bool(shared[1] > 0)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> Result:
        cfg, main, say = self.cfg, self.main, self.say
        self.resume()
        if self.step >= cfg.train.steps:
            say(f"nothing to do: {self.resume_from} is at step {self.step} and train.steps={cfg.train.steps}")
            previous = self.out_dir / "summary.json"
            return Result(self.out_dir, self.step, False, json.loads(previous.read_text()) if main and previous.is_file() else {})

        self.state_now = distopt.state_bytes(self.optimizer)
        self.metrics = JsonlLog(self.out_dir / "metrics.jsonl", main, resume_step=self.step if self.resuming else None)
        self.progress.start = self.step
        say(self._banner())
        self.sampler = Sampler(self.data.train, cfg.train.seed)
        self.preempt = ckpt.Preemption().install()
        self.config_text = dump_config(cfg)
        self.engine.model.train()
        preempted = stopped = diverged = False
        bad_steps = 0  # consecutive steps with a non-finite loss or gradient norm
        interval_losses: list[float] = []
        try:
            if self.step == 0 and cfg.eval.every and self.step < cfg.train.steps:
                self.evaluate(0)
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                loss_value, grad_norm, lr_now, stop_signal = self.train_step()
                step = self.step
                dt = time.perf_counter() - t0
                self.step_times.append(dt)
                self.train_losses.append(loss_value)
                interval_losses.append(loss_value)
                finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm))
                bad_steps = 0 if finite else bad_steps + 1
                if not finite and main:
                    logger.warning("step %d: loss %s, gradient norm %s", step, loss_value, grad_norm)
                if cfg.train.max_bad_steps and bad_steps >= cfg.train.max_bad_steps:
                    diverged = True
                    say(f"DIVERGED: {bad_steps} consecutive steps with a non-finite loss or gradient norm (step {step}, "
                        f"loss {loss_value}, gradient norm {grad_norm}); stopping without a checkpoint of this state. "
                        f"Last checkpoint: {self.last_ckpt or 'none'}. Lower optim.lr, or resume from an earlier checkpoint.")
                    break
                final = step == cfg.train.steps
                stop_here = stop_signal or (cfg.train.stop_at and step == cfg.train.stop_at)
                if step % cfg.log.every == 0 or step == 1 or final or stop_here:
                    self.state_now = distopt.state_bytes(self.optimizer)
                    peak, peak_kind = peak_memory(self.device)
                    self.metrics.write({
                        "kind": "train", "step": step, "loss": statistics.fmean(interval_losses), "lr": lr_now,
                        "grad_norm": grad_norm,
                        "tokens_per_s": self.tokens_per_step * len(interval_losses) / sum(self.step_times[-len(interval_losses):]),
                        "step_time_s": dt, "tokens": step * self.tokens_per_step, "peak_mem_bytes": peak,
                        "peak_mem_kind": peak_kind, "state_bytes": self.state_now,
                    })
                    interval_losses = []
                tok_s = self.tokens_per_step / statistics.fmean(self.step_times[-20:])
                self.progress.update(step, loss_value, lr_now, tok_s)
                if cfg.eval.every and step % cfg.eval.every == 0 and not final:
                    self.evaluate(step)
                if final or stop_here or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    if final:
                        self.evaluate(step)
                    if bad_steps:  # never checkpoint a state the last step left non-finite or skipped
                        say(f"step {step}: no checkpoint, the step's loss or gradient norm was not finite")
                    else:
                        self.last_ckpt = self.save(step)
                if stop_here:
                    preempted, stopped = stop_signal, True
                    break
        finally:
            self.preempt.uninstall()
            self.progress.close()

        summary = {}
        if main:
            status = "diverged" if diverged else "preempted" if preempted else "stopped" if stopped else "completed"
            summary = self.summary(status, preempted, stopped)
            if preempted:
                say(f"stopped by signal at step {self.step}; checkpoint {self.last_ckpt}. Resume with --resume.")
            else:
                say(summary["screen"])
        return Result(self.out_dir, self.step, preempted, summary, diverged)

    def summary(self, status: str, preempted: bool, stopped: bool) -> dict:
        """``summary.json`` (written) and the one-screen table (``"screen"``) of the run so far."""
        cfg, info, plan, step = self.cfg, self.info, self.plan, self.step
        train_losses, step_times, eval_history = self.train_losses, self.step_times, self.eval_history
        jsonl = self.out_dir / "metrics.jsonl"
        png = None
        if cfg.log.plot and not preempted:
            png = plot_runs({cfg.name: jsonl}, self.out_dir / "loss.png", f"{cfg.name}: {self.engine.describe()}")
        steady = step_times[1:] or step_times
        tok_s = self.tokens_per_step * len(steady) / sum(steady) if steady else float("nan")
        tail = train_losses[-max(1, min(20, len(train_losses) // 10 or 1)):]
        final_train = statistics.fmean(tail) if tail else float("nan")
        # The whole run's first values, from the metrics (this process may have resumed half-way).
        records = read_jsonl(jsonl) if jsonl.is_file() else []
        first_train = next((r["loss"] for r in records if r.get("kind") == "train"), train_losses[0] if train_losses else float("nan"))
        first_val = next((r["val_loss"] for r in records if r.get("kind") == "eval"), eval_history[0][1] if eval_history else float("nan"))
        val = eval_history[-1][1] if eval_history else float("nan")
        peak, peak_kind = peak_memory(self.device)
        state = self.state_now
        ratio = plan.adamw_state_bytes / state if state else float("inf")
        summary = {
            "status": status, "run": cfg.name, "out_dir": str(self.out_dir), "optimizer": cfg.optim.name,
            "hparams": cfg.optim.hparams, "model": cfg.model.name, "engine": self.engine.name, "world_size": info.world_size,
            "steps": step, "tokens": step * self.tokens_per_step, "final_train_loss": final_train, "first_train_loss": first_train,
            "final_val_loss": val, "first_val_loss": first_val, "best_val_loss": self.best_val,
            "tokens_per_s": tok_s, "step_time_s": statistics.median(steady) if steady else float("nan"),
            "train_seconds": self.elapsed_before + sum(step_times), "peak_mem_bytes": peak, "peak_mem_kind": peak_kind,
            "state_bytes": state, "adamw_state_bytes": plan.adamw_state_bytes, "num_params": plan.num_params,
            "state_bytes_per_param": state / plan.num_params, "metrics": str(jsonl),
            "plot": str(png) if png else None, "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "stopped_early": stopped,
        }
        rows = [
            ("run", f"{cfg.name}: {step} steps, {human_count(step * self.tokens_per_step)} tokens in "
                    f"{human_time(summary['train_seconds'])}"),
            ("train loss", f"{first_train:.3f} -> {final_train:.3f}" + (f" (mean of the last {len(tail)} steps)" if len(tail) > 1 else "")),
            ("val loss", f"{first_val:.3f} -> {val:.3f}" + (f" (step {eval_history[-1][0]})" if eval_history else "")),
            ("throughput", f"{human_count(tok_s)} tokens/s over {info.world_size} rank(s), {summary['step_time_s'] * 1000:.0f} ms/step"),
            ("optimizer state", f"{cfg.optim.name}: {human_bytes(state)} ({state / plan.num_params:.2f} B/param) vs AdamW "
                                f"{human_bytes(plan.adamw_state_bytes)} ({plan.adamw_state_bytes / plan.num_params:.2f} B/param): "
                                + (f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.1f}x larger")),
            ("peak memory", f"{human_bytes(peak)} on rank 0 ({'CUDA allocated' if peak_kind.startswith('cuda') else 'process RSS'})"),
            ("metrics", str(jsonl)),
            ("loss curve", str(png) if png else PLOT_HINT.format(jsonl=jsonl) if cfg.log.plot else "off (log.plot=false)"),
            ("checkpoint", str(self.last_ckpt) if self.last_ckpt else "none"),
        ]
        title = {"diverged": f"DIVERGED at step {step}", "stopped": f"stopped at step {step} (train.stop_at)"}.get(status, "done")
        summary["screen"] = summary_table(rows, title)
        write_json_atomic(self.out_dir / "summary.json", {k: v for k, v in summary.items() if k != "screen"})
        return summary
