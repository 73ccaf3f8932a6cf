"""The GPU benchmark suite: every optimizer side by side on one GPU, in one process.

Sections (``--sections``, comma-separated; all by default):

- ``step``: the optimizer step alone on LLaMA-1B parameters with fixed random gradients, over one
  first step and a full refresh cycle of ``--gap`` steps: amortized (mean) step, worst single step,
  first step and ``distopt.state_bytes``, for torch fused AdamW, galore-torch, adam-mini and our
  ``galore``, ``adapm-mini``, ``grassjump`` and ``subtrack`` (rank 512, gap 200).
- ``e2e``: a whole training step of ``transformers.LlamaForCausalLM``-1B, batch 8 x 1024, bf16
  autocast, fp32 master weights: tokens/s and peak memory for AdamW and the flagship optimizers.
- ``maxbatch``: the largest batch that fits (doubling, then bisection; out-of-memory errors are
  caught and memory is freed between tries) and the tokens/s at that batch.
- ``7b``: LLaMA-7B on one GPU with bf16 weights, our low-rank states, activation checkpointing and
  the layer-wise mode (``distopt.engines.layerwise``), batch 1 x 2048; then AdamW at 7B, where an
  out-of-memory error is reported (with the bytes it tried to allocate) instead of raised.
- ``memory``: the ``distopt memory`` estimate against the measured peak of the 1B and 7B runs.

Results go to ``--out`` (JSON, rewritten after every section) and ``<out>.md`` (one markdown table
per section, plus the goals). The goals are printed against the H100 anchor measurements.

The script needs only torch with CUDA. Where galore-torch, adam-mini or transformers is missing it
installs the wheels found in ``--wheels`` (default ``.whl`` at the repo root) with
``pip install --no-index --no-deps --target <--site>``, never from the network; a row whose package
is still missing is skipped with a note. See docs/benchmarks.md.

    python benchmarks/gpu_suite.py                                  # cuda, LLaMA-1B and 7B shapes
    python benchmarks/gpu_suite.py --sections step,e2e --gap 200
    python benchmarks/gpu_suite.py --device cpu --tiny              # the logic, on CPU, in seconds
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
import types
import warnings
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import environment, markdown_table, summarize, timed, write_json

import distopt
from distopt import memory
from distopt.engines import layerwise
from distopt.models import LLAMA_1B
from distopt.optim import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("step", "e2e", "maxbatch", "7b", "memory")
STEP_OPTIMIZERS = ("adamw-fused", "galore-torch", "adam-mini", "galore", "adapm-mini", "grassjump", "subtrack")
PEER_ROWS = ("adamw-fused", "adamw-foreach", "galore-torch", "adam-mini")
GIB = 1024**3

# What the anchor measurements found on one H100 80GB (torch fused AdamW, galore-torch 1.0 and
# adam-mini 1.1.1 on LLaMA-1B shapes; see the anchors' README). Printed beside the goals.
ANCHORS = {
    "step_adamw_fused_ms": 15.7,
    "step_galore_torch_r512_steady_ms": 77.9,
    "step_galore_torch_r512_amortized_x_adamw": 17.6,
    "step_adam_mini_ms": 48.0,
    "e2e_adamw_fused_tokens_per_s": 16261,
    "e2e_adamw_fused_peak_GB": 41.4,
    "e2e_galore_torch_r512_tokens_per_s": 15677,
    "e2e_adam_mini_tokens_per_s": 15728,
}
# The 7B rows, by name (the memory section looks them up).
RUN_7B_OURS = "{} (bf16, layer-wise, checkpointing)"
RUN_7B_FUSED = "adamw-fused (fp32 master, checkpointing)"
RUN_7B_LAYERWISE = "adamw (bf16, layer-wise, checkpointing)"
GOALS = {"step_x_adamw": 1.0, "e2e_x_adamw": 0.98, "maxbatch_x_adamw": 1.3, "memory_error": 0.10, "7b_gpu_gib": 80}


# -- shapes and settings ------------------------------------------------------------------------
def _shapes(tiny: bool):
    """(1B-like, 7B-like) ``distopt.job.modeling.ModelShape`` for the models."""
    from distopt.job.modeling import ModelShape

    if tiny:
        return (ModelShape(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128),
                ModelShape(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128))
    one_b = ModelShape(vocab_size=LLAMA_1B.vocab_size, hidden_size=LLAMA_1B.hidden_size,
                       intermediate_size=LLAMA_1B.intermediate_size, num_hidden_layers=LLAMA_1B.num_hidden_layers,
                       num_attention_heads=LLAMA_1B.num_attention_heads,
                       max_position_embeddings=LLAMA_1B.max_position_embeddings)
    # LLaMA-7B as in configs/models/llama_7b.yaml (the GaLore paper's 7B).
    seven_b = ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048)
    return one_b, seven_b


@dataclasses.dataclass
class Config:
    device: str
    tiny: bool
    shape_1b: object
    shape_7b: object
    rank: int
    rank_7b: int
    gap: int
    lr: float
    seed: int
    batch: int
    seq: int
    e2e_steps: int
    maxbatch_cap: int
    maxbatch_try_steps: int
    batch_7b: int
    seq_7b: int
    steps_7b: int
    impl: str
    tf32_step: bool

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# -- peers: galore-torch, adam-mini, transformers -----------------------------------------------
PEERS = {"galore_torch": "galore-torch", "adam_mini": "adam-mini", "transformers": "transformers"}


def _wheel_dist(path: Path) -> str:
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _pip_install(wheels: list[Path], site: Path, notes: list[str]) -> None:
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
            "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*base, *map(str, wheels)], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        notes.append(f"installed {len(wheels)} wheel(s) into {site}")
        return
    if "No module named pip" in done.stderr:
        for wheel in wheels:  # a wheel is a zip of its installed files
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        notes.append(f"pip is not available: unpacked {len(wheels)} wheel(s) into {site}")
        return
    failed = []
    for wheel in wheels:  # one by one, so that a wheel for another platform does not block the rest
        if subprocess.run([*base, str(wheel)], capture_output=True, text=True, check=False).returncode:
            failed.append(wheel.name)
    notes.append(f"installed {len(wheels) - len(failed)} wheel(s) into {site}"
                 + (f"; could not install {', '.join(failed)}" if failed else ""))


def ensure_peers(wheels: Path, site: Path, notes: list[str]) -> dict:
    """Make galore-torch, adam-mini and transformers importable from local wheels where they are
    missing. Returns the version of each (None when still missing)."""
    if site.is_dir() and str(site) not in sys.path:
        sys.path.insert(0, str(site))  # installed by an earlier run
        importlib.invalidate_caches()
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    if missing:
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        todo = [w for w in found if not _installed(_wheel_dist(w))]
        if todo:
            site.mkdir(parents=True, exist_ok=True)
            _pip_install(todo, site, notes)
            if str(site) not in sys.path:
                sys.path.insert(0, str(site))
            importlib.invalidate_caches()
        elif not found:
            notes.append(f"{', '.join(PEERS[m] for m in missing)} not installed and no wheels in {wheels}")
    if importlib.util.find_spec("yaml") is None:
        # distopt.job.modeling imports yaml to read config files; this script passes shapes directly.
        sys.modules["yaml"] = types.ModuleType("yaml")
        notes.append("pyyaml is not installed: config files cannot be read (not needed here)")
    versions = {}
    for module, dist in PEERS.items():
        versions[dist] = None
        if importlib.util.find_spec(module) is not None:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "unknown"
    for dist in ("galore-torch", "adam-mini"):
        if versions[dist] is None:
            notes.append(f"{dist} is not available: its rows are skipped")
    return versions


class Skip(Exception):
    """A row that cannot run here (a comparison package is missing)."""


def _import_galore_torch():
    # galore_torch imports bitsandbytes for its 8-bit class only, which is not measured here; where
    # bitsandbytes is missing or fails to load, stand-in modules let the package import.
    try:
        import bitsandbytes.optim.optimizer  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load it means the stand-in is needed
        bnb, bnb_optim, bnb_inner = (types.ModuleType(n) for n in
                                     ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer"))
        bnb_inner.Optimizer2State = object
        sys.modules.update({"bitsandbytes": bnb, "bitsandbytes.optim": bnb_optim,
                            "bitsandbytes.optim.optimizer": bnb_inner})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
    except ImportError as err:
        raise Skip(f"galore-torch is not importable ({err})") from None
    return GaLoreAdamW


# -- optimizers ---------------------------------------------------------------------------------
def _takes(name: str, key: str) -> bool:
    return key in inspect.signature(REGISTRY[name].__init__).parameters


def label_hparams(label: str) -> dict:
    """Hyper-parameters a row label sets: ``galore[projection_precision=tf32,rank=256]``."""
    if not label.endswith("]") or "[" not in label:
        return {}
    out = {}
    for item in label[label.index("[") + 1 : -1].split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def distopt_name(label: str) -> str | None:
    """The distopt registry name of a row label (``galore``, ``distopt:adam-mini``,
    ``galore[projection_precision=tf32]``), else None."""
    if label in PEER_ROWS:
        return None
    name = label.removeprefix("distopt:").split("[")[0]
    return name if name in REGISTRY else None


def check_labels(labels: list[str]) -> list[str]:
    return [x for x in labels if x not in PEER_ROWS and distopt_name(x) is None]


def make_optimizer(label: str, model: torch.nn.Module, shape, *, rank: int, gap: int, lr: float):
    """(optimizer, source, distopt hyper-parameters or None) for a row label."""
    if label in ("adamw-fused", "adamw-foreach"):
        fused = label == "adamw-fused"
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused), "torch", None
    if label == "galore-torch":
        cls = _import_galore_torch()
        split = distopt.build_optimizer(model, "galore", rank=rank)  # our routing picks the same matrices
        groups = [{"params": g["params"]} if g["kind"] == "adamw" else
                  {"params": g["params"], "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
                  for g in split.param_groups]
        del split
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(groups, lr=lr), f"galore-torch {importlib.metadata.version('galore-torch')}", None
    if label == "adam-mini":
        try:
            from adam_mini import Adam_mini
        except ImportError as err:
            raise Skip(f"adam-mini is not importable ({err})") from None
        opt = Adam_mini(named_parameters=model.named_parameters(), lr=lr, dim=shape.hidden_size,
                        n_heads=shape.num_attention_heads, n_kv_heads=shape.kv_heads, verbose=False)
        return opt, f"adam-mini {importlib.metadata.version('adam-mini')}", None
    name = distopt_name(label)
    hparams = {"lr": lr}
    if _takes(name, "rank"):
        hparams["rank"] = rank
    if _takes(name, "update_proj_gap"):
        hparams["update_proj_gap"] = gap
    hparams.update(label_hparams(label))
    return distopt.build_optimizer(model, name, **hparams), f"distopt {distopt.__version__}", hparams


# -- device helpers -----------------------------------------------------------------------------
def free(cfg: Config) -> None:
    gc.collect()
    if cfg.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(cfg: Config) -> int | None:
    return torch.cuda.max_memory_allocated() if cfg.cuda else None


def allocated_bytes(cfg: Config) -> int | None:
    return torch.cuda.memory_allocated() if cfg.cuda else None


def max_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB); a CPU stand-in for peak memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def tried_bytes(message: str) -> int | None:
    """The allocation an out-of-memory error names ("Tried to allocate 2.00 GiB")."""
    found = re.search(r"Tried to allocate ([\d.]+) ?(B|KiB|MiB|GiB|TiB)", message)
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(err)


def attempt(fn, cfg: Config, progress: dict):
    """``(fn(), None)``, or ``(None, failure)`` where ``fn`` ran out of memory (``status`` "OOM",
    with the bytes it tried to allocate and the peak reached) or raised (``status`` "error").
    Memory is freed before returning either way."""
    failure = None
    try:
        result = fn()
    except Skip as err:
        failure = {"status": "skipped", "note": str(err)}
    except Exception as err:  # noqa: BLE001 - one failing row must not stop the suite
        if _is_oom(err):
            text = str(err)
            failure = {"status": "OOM", "phase": progress.get("phase"), "tried_bytes": tried_bytes(text),
                       "peak_bytes": peak_bytes(cfg), "message": text.strip().splitlines()[0][:300]}
        else:
            traceback.print_exc()
            failure = {"status": "error", "phase": progress.get("phase"), "message": f"{type(err).__name__}: {err}"[:500]}
    if failure is not None:
        free(cfg)
        return None, failure
    return result, None


# -- a model and optimizer stepping random batches ----------------------------------------------
def loss_of(model: torch.nn.Module, ids: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "hf":
        return model(input_ids=ids, labels=ids).loss
    return model(ids, ids)


class Run:
    """A freshly initialized LLaMA and an optimizer on the device, trained on random tokens."""

    def __init__(self, label: str, shape, cfg: Config, *, rank: int, bf16_weights: bool = False,
                 checkpointing: bool = False, layerwise_mode: bool = False, progress: dict | None = None):
        from distopt.job.modeling import build_model

        self.cfg, self.progress = cfg, progress if progress is not None else {}
        self.progress["phase"] = "build model"
        torch.manual_seed(cfg.seed)
        with default_dtype(torch.bfloat16 if bf16_weights else torch.float32), torch.device(cfg.device):
            self.model = build_model(shape, cfg.impl, activation_checkpointing=checkpointing and cfg.impl == "hf")
        self.model.train()
        self.vocab = shape.vocab_size
        self.progress["phase"] = "build optimizer"
        self.optimizer, self.source, self.hparams = make_optimizer(label, self.model, shape, rank=rank, gap=cfg.gap,
                                                                   lr=cfg.lr)
        self.handle = layerwise.attach(self.optimizer) if layerwise_mode else None
        self.autocast = not bf16_weights
        self.after_step_bytes = None
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
        self.progress["phase"] = "built"

    def batch(self, size: int, seq: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (size, seq), generator=self.generator, device=self.cfg.device)

    def step(self, ids: torch.Tensor) -> None:
        self.progress["phase"] = "forward"
        dev_type = torch.device(self.cfg.device).type
        context = torch.autocast(dev_type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with context:
            loss = loss_of(self.model, ids, self.cfg.impl)
        self.progress["phase"] = "backward"
        loss.backward()
        if self.handle is None:
            self.progress["phase"] = "optimizer step"
            self.optimizer.step()
        if self.after_step_bytes is None:  # weights, gradients (none in layer-wise mode) and state
            self.after_step_bytes = allocated_bytes(self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        self.progress["phase"] = "stepped"

    def measure(self, size: int, seq: int, steps: int) -> dict:
        """Time ``steps`` training steps at ``size x seq`` (after one untimed-for-throughput first step)."""
        ids = self.batch(size, seq)
        if self.cfg.cuda:
            torch.cuda.reset_peak_memory_stats()
        first = timed(lambda: self.step(ids), self.cfg.device)
        times = [timed(lambda: self.step(ids), self.cfg.device) for _ in range(steps)]
        stats = summarize(times)
        tokens = size * seq
        return {"batch": size, "seq": seq, "first_ms": first, **stats,
                "tokens_per_s": tokens / (stats["mean_ms"] / 1e3),
                "tokens_per_s_median": tokens / (stats["median_ms"] / 1e3),
                "peak_bytes": peak_bytes(self.cfg), "after_step_bytes": self.after_step_bytes,
                "state_bytes": distopt.state_bytes(self.optimizer),
                "max_rss_bytes": None if self.cfg.cuda else max_rss_bytes(), "source": self.source}


def largest_batch(fits, start: int = 1, cap: int | None = None) -> dict:
    """The largest batch ``b >= start`` with ``fits(b)`` true, by doubling and then bisection
    between the last batch that fit and the first that did not. ``cap`` bounds the search."""
    tried, best, bad = [], 0, None
    size = start
    while True:
        ok = fits(size)
        tried.append({"batch": size, "fits": ok})
        if not ok:
            bad = size
            break
        best = size
        if cap is not None and size >= cap:
            return {"max_batch": best, "capped": True, "tried": tried}
        size = size * 2 if cap is None else min(size * 2, cap)
    while best and bad - best > 1:
        mid = (best + bad) // 2
        ok = fits(mid)
        tried.append({"batch": mid, "fits": ok})
        best, bad = (mid, bad) if ok else (best, mid)
    return {"max_batch": best, "capped": False, "tried": tried}


# -- sections -----------------------------------------------------------------------------------
RUNS: dict[tuple[str, str], dict] = {}  # (scale, label) -> measured row, shared with the memory section
_running_rows: list[dict] = []  # the running section's finished rows, saved if the run is stopped


def _new_rows() -> list[dict]:
    global _running_rows
    _running_rows = []
    return _running_rows


def section_step(cfg: Config, labels: list[str]) -> dict:
    from distopt.job.modeling import build_model

    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32_step
    rows = _new_rows()
    for label in labels:
        progress: dict = {}

        def one(label=label, progress=progress):
            torch.manual_seed(cfg.seed)
            with torch.device(cfg.device):
                model = build_model(cfg.shape_1b, "native")  # parameters only: HF names, no transformers needed
            generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator, device=cfg.device) * 1e-3
            optimizer, source, _ = make_optimizer(label, model, cfg.shape_1b, rank=cfg.rank, gap=cfg.gap, lr=cfg.lr)
            before = allocated_bytes(cfg)
            progress["phase"] = "first step"
            first = timed(optimizer.step, cfg.device)
            state_alloc = allocated_bytes(cfg) - before if cfg.cuda else None
            progress["phase"] = "refresh cycle"
            cycle = [timed(optimizer.step, cfg.device) for _ in range(cfg.gap)]
            params = sum(p.numel() for p in model.parameters())
            row = {"optimizer": label, "source": source, "status": "ok", "first_ms": first, **summarize(cycle),
                   "state_bytes": distopt.state_bytes(optimizer), "state_alloc_bytes": state_alloc, "params": params}
            del optimizer, model
            return row

        row, failure = attempt(one, cfg, progress)
        rows.append(row or {"optimizer": label, **failure})
        free(cfg)
        print(f"  step {label}: {_brief(rows[-1], 'mean_ms')}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        row["worst_vs_median"] = row["max_ms"] / row["median_ms"]
        row["state_bytes_per_param"] = row["state_bytes"] / row["params"]
        if base:
            row["amortized_x_fused_adamw"] = row["mean_ms"] / base["mean_ms"]
            row["worst_x_fused_adamw"] = row["max_ms"] / base["mean_ms"]
            row["state_x_adamw"] = row["state_bytes"] / base["state_bytes"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("mean_ms", "amortized ms", ".2f"),
        ("median_ms", "median ms", ".2f"), ("max_ms", "worst ms", ".2f"), ("first_ms", "first ms", ".1f"),
        ("amortized_x_fused_adamw", "amortized x fused AdamW", ".2f"), ("worst_vs_median", "worst/median", ".2f"),
        ("state_bytes", "state bytes", "d"), ("state_x_adamw", "state x AdamW", ".3f"), ("note", "note", "s"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "rank": cfg.rank, "gap": cfg.gap, "tf32": cfg.tf32_step,
                "timed": "one first step, then a refresh cycle of `gap` steps (amortized = its mean, worst = its max)"}
    return {"settings": settings, "rows": rows, "markdown": table}


def _train_row(label: str, shape, cfg: Config, size: int, seq: int, steps: int, *, rank: int, scale: str,
               bf16_weights: bool = False, checkpointing: bool = False, layerwise_mode: bool = False, run_name=None) -> dict:
    progress: dict = {}

    def one():
        run = Run(label, shape, cfg, rank=rank, bf16_weights=bf16_weights, checkpointing=checkpointing,
                  layerwise_mode=layerwise_mode, progress=progress)
        row = run.measure(size, seq, steps)
        row["hparams"] = run.hparams
        del run
        return row

    free(cfg)
    row, failure = attempt(one, cfg, progress)
    row = {"run": run_name or label, "optimizer": label, "status": "ok", **(row or failure), "scale": scale,
           "weights": "bf16" if bf16_weights else "fp32 master, bf16 autocast",
           "checkpointing": checkpointing and cfg.impl == "hf", "layerwise": layerwise_mode, "model": cfg.impl}
    if checkpointing and cfg.impl != "hf":
        row["note"] = "no activation checkpointing: it needs transformers"
    RUNS[(scale, run_name or label)] = row
    free(cfg)
    print(f"  {scale} {run_name or label}: {_brief(row, 'tokens_per_s')}", file=sys.stderr, flush=True)
    return row


def section_e2e(cfg: Config, labels: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchors' end-to-end runs
    rows = _new_rows()
    for label in labels:
        rows.append(_train_row(label, cfg.shape_1b, cfg, cfg.batch, cfg.seq, cfg.e2e_steps, rank=cfg.rank, scale="1b"))
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["peak_gib"] = None if row["peak_bytes"] is None else row["peak_bytes"] / GIB
            if base:
                row["tokens_x_adamw"] = row["tokens_per_s"] / base["tokens_per_s"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("batch", "batch", "d"), ("seq", "seq", "d"),
        ("mean_ms", "step ms (mean)", ".1f"), ("median_ms", "median ms", ".1f"), ("first_ms", "first ms", ".0f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("tokens_x_adamw", "x AdamW", ".3f"), ("peak_gib", "peak GiB", ".2f"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "model": cfg.impl, "batch": cfg.batch, "seq": cfg.seq,
                "steps": cfg.e2e_steps, "rank": cfg.rank, "gap": cfg.gap, "autocast": "bf16", "tf32": cfg.cuda}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_maxbatch(cfg: Config, labels: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = _new_rows()
    for label in labels:
        progress: dict = {}

        def one(label=label, progress=progress):
            run = Run(label, cfg.shape_1b, cfg, rank=cfg.rank, progress=progress)

            def fits(size: int) -> bool:
                def tries():
                    ids = run.batch(size, cfg.seq)
                    for _ in range(cfg.maxbatch_try_steps):
                        run.step(ids)

                _, failure = attempt(tries, cfg, progress)
                run.optimizer.zero_grad(set_to_none=True)
                free(cfg)
                if failure and failure["status"] != "OOM":
                    raise RuntimeError(failure["message"])
                print(f"    {label} batch {size}: {'fits' if failure is None else 'OOM'}", file=sys.stderr, flush=True)
                return failure is None

            search = largest_batch(fits, start=1, cap=cfg.maxbatch_cap)
            row = {"max_batch": search["max_batch"], "capped": search["capped"], "tried": search["tried"]}
            if search["max_batch"]:
                measured, failure = attempt(lambda: run.measure(search["max_batch"], cfg.seq, cfg.e2e_steps), cfg, progress)
                row.update(measured or {**failure, "status": f"{failure['status']} when timing the largest batch"})
            return row

        free(cfg)
        row, failure = attempt(one, cfg, progress)
        rows.append({"optimizer": label, "status": "ok", **(row or failure)})
        free(cfg)
        print(f"  maxbatch {label}: {_brief(rows[-1], 'tokens_per_s')}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["optimizer"] == "adamw-fused" and r["status"] == "ok" and r.get("tokens_per_s")), None)
    for row in rows:
        if row["status"] == "ok" and row.get("tokens_per_s"):
            row["peak_gib"] = None if row.get("peak_bytes") is None else row["peak_bytes"] / GIB
            row["tries"] = len(row["tried"])
            if base:
                row["tokens_x_adamw"] = row["tokens_per_s"] / base["tokens_per_s"]
    table = markdown_table(rows, [
        ("optimizer", "optimizer", "s"), ("status", "status", "s"), ("max_batch", "max batch", "d"),
        ("capped", "capped", ""), ("seq", "seq", "d"), ("tokens_per_s", "tokens/s", ".0f"),
        ("tokens_x_adamw", "x AdamW (at its max batch)", ".3f"), ("peak_gib", "peak GiB", ".2f"), ("tries", "tries", "d"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_1b), "seq": cfg.seq, "cap": cfg.maxbatch_cap,
                "steps_per_try": cfg.maxbatch_try_steps, "search": "doubling from 1, then bisection"}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_7b(cfg: Config, optimizer: str, adamw_rows: list[str]) -> dict:
    if cfg.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = _new_rows()
    rows.append(_train_row(optimizer, cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b, rank=cfg.rank_7b,
                           scale="7b", bf16_weights=True, checkpointing=True, layerwise_mode=True,
                           run_name=RUN_7B_OURS.format(optimizer)))
    for variant in adamw_rows:
        if variant == "fused":  # the usual recipe: fp32 master weights, bf16 autocast, fused AdamW
            rows.append(_train_row("adamw-fused", cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b,
                                   rank=cfg.rank_7b, scale="7b", checkpointing=True,
                                   run_name=RUN_7B_FUSED))
        elif variant == "layerwise":  # AdamW with every memory saving the flagship row uses
            rows.append(_train_row("adamw", cfg.shape_7b, cfg, cfg.batch_7b, cfg.seq_7b, cfg.steps_7b,
                                   rank=cfg.rank_7b, scale="7b", bf16_weights=True, checkpointing=True,
                                   layerwise_mode=True, run_name=RUN_7B_LAYERWISE))
    for row in rows:
        row["peak_gib"] = None if row.get("peak_bytes") is None else row["peak_bytes"] / GIB
        row["tried_gib"] = None if row.get("tried_bytes") is None else row["tried_bytes"] / GIB
    table = markdown_table(rows, [
        ("run", "run", "s"), ("status", "status", "s"), ("batch", "batch", "d"), ("seq", "seq", "d"),
        ("mean_ms", "step ms", ".0f"), ("tokens_per_s", "tokens/s", ".0f"), ("peak_gib", "peak GiB", ".2f"),
        ("phase", "failed in", "s"), ("tried_gib", "tried to allocate GiB", ".2f"), ("note", "note", "s"),
    ])
    settings = {"shape": dataclasses.asdict(cfg.shape_7b), "model": cfg.impl, "batch": cfg.batch_7b,
                "seq": cfg.seq_7b, "steps": cfg.steps_7b, "rank": cfg.rank_7b, "gap": cfg.gap}
    return {"settings": settings, "rows": rows, "markdown": table}


def section_memory(cfg: Config, flagship: list[str], optimizer_7b: str, adamw_rows: list[str]) -> dict:
    """``distopt memory``'s model-state estimate (engine single, one rank) against the measured
    peak of each 1B and 7B run; runs that were not measured in this process are run here."""
    from distopt.job.modeling import build_model

    plans = [("1b", label, label, "bf16-mixed", {}) for label in ["adamw-fused", *flagship]]
    plans.append(("7b", RUN_7B_OURS.format(optimizer_7b), optimizer_7b, "bf16",
                  {"bf16_weights": True, "checkpointing": True, "layerwise_mode": True}))
    if "fused" in adamw_rows:
        plans.append(("7b", RUN_7B_FUSED, "adamw-fused", "bf16-mixed", {"checkpointing": True}))
    if "layerwise" in adamw_rows:
        plans.append(("7b", RUN_7B_LAYERWISE, "adamw", "bf16",
                      {"bf16_weights": True, "checkpointing": True, "layerwise_mode": True}))
    metas = {}
    rows = _new_rows()
    for scale, run_name, label, precision, options in plans:
        shape = cfg.shape_1b if scale == "1b" else cfg.shape_7b
        rank = cfg.rank if scale == "1b" else cfg.rank_7b
        measured = RUNS.get((scale, run_name))
        if measured is None:
            size, seq = (cfg.batch, cfg.seq) if scale == "1b" else (cfg.batch_7b, cfg.seq_7b)
            measured = _train_row(label, shape, cfg, size, seq, 2, rank=rank, scale=scale, run_name=run_name, **options)
        name = distopt_name(label) or ("adamw" if label.startswith("adamw") else None)
        row = {"scale": scale, "run": run_name, "precision": precision, "status": measured.get("status"),
               "batch": measured.get("batch"), "seq": measured.get("seq")}
        if name is None:
            row["note"] = f"{label} has no distopt estimate"
        else:
            if scale not in metas:
                with torch.device("meta"):
                    metas[scale] = build_model(shape, cfg.impl)
            hparams = {k: v for k, v in (measured.get("hparams") or {}).items() if k != "lr"}
            if name != "adamw" and not hparams:
                hparams = {k: v for k, v in (("rank", rank), ("update_proj_gap", cfg.gap)) if _takes(name, k)}
            b = memory.estimate(metas[scale], name, "single", 1, precision, hparams=hparams)
            row.update(estimate_bytes=b.total, estimate_weights=b.weights, estimate_gradients=b.gradients,
                       estimate_state=b.optimizer_state, estimate_projectors=b.projectors, estimate_hparams=hparams)
            if options.get("layerwise_mode"):
                row["note"] = "layer-wise mode frees each gradient in backward; the estimate counts all of them"
        ok = measured.get("status") == "ok"
        row["measured_state_bytes"] = measured.get("state_bytes") if ok else None
        if ok and row.get("estimate_bytes") is not None and row["measured_state_bytes"]:
            row["state_x_estimate"] = row["measured_state_bytes"] / (row["estimate_state"] + row["estimate_projectors"])
        peak = measured.get("peak_bytes") if ok else None
        states = measured.get("after_step_bytes") if ok else None
        row.update(measured_peak_bytes=peak, measured_states_bytes=states)
        if not ok:
            row["peak_at_failure_bytes"] = measured.get("peak_bytes")
            row["tried_bytes"] = measured.get("tried_bytes")
        if row.get("estimate_bytes"):
            row["estimate_gib"] = row["estimate_bytes"] / GIB
            if peak:
                row["peak_gib"] = peak / GIB
                row["peak_x_estimate"] = peak / row["estimate_bytes"]
            if states:
                row["states_gib"] = states / GIB
                row["states_x_estimate"] = states / row["estimate_bytes"]
        rows.append(row)
    table = markdown_table(rows, [
        ("scale", "model", "s"), ("run", "run", "s"), ("status", "status", "s"), ("estimate_bytes", "estimate bytes", "d"),
        ("estimate_gib", "estimate GiB", ".2f"), ("measured_state_bytes", "optimizer state bytes", "d"), ("state_x_estimate", "state / estimated state", ".3f"),
        ("peak_gib", "measured peak GiB", ".2f"), ("peak_x_estimate", "peak / estimate", ".3f"),
        ("states_gib", "after-step GiB", ".2f"), ("states_x_estimate", "after-step / estimate", ".3f"),
        ("note", "note", "s"),
    ])
    settings = {"estimate": "distopt.memory.estimate(engine='single', world_size=1): weights, gradients, optimizer "
                            "state and projectors; activations are not counted",
                "after_step": "memory allocated right after the first optimizer step (weights, gradients, state)",
                "state": "distopt.state_bytes of the run's optimizer against the estimate's state + projectors"}
    return {"settings": settings, "rows": rows, "markdown": table}


# -- goals --------------------------------------------------------------------------------------
def _ok(rows, key, value):
    return next((r for r in rows if r.get(key) == value and r.get("status") == "ok"), None)


def goals(cfg: Config, sections: dict, flagship: list[str], optimizer_7b: str, limit_bytes: int | None) -> list[dict]:
    out = []

    def add(goal, target, measured, met, anchor=None):
        out.append({"goal": goal, "target": target, "measured": measured, "met": met, "anchor": anchor})

    if "step" in sections:
        rows = sections["step"]["rows"]
        gt = _ok(rows, "optimizer", "galore-torch")
        for label in flagship:
            r = _ok(rows, "optimizer", label)
            x = r.get("amortized_x_fused_adamw") if r else None
            add(f"step: {label} amortized step x torch fused AdamW", f"<= {GOALS['step_x_adamw']}",
                x, None if x is None else x <= GOALS["step_x_adamw"],
                f"galore-torch {ANCHORS['step_galore_torch_r512_amortized_x_adamw']}x (H100)"
                + (f"; here {gt['amortized_x_fused_adamw']:.2f}x" if gt and gt.get("amortized_x_fused_adamw") else ""))
    if "e2e" in sections:
        for label in flagship:
            r = _ok(sections["e2e"]["rows"], "optimizer", label)
            x = r.get("tokens_x_adamw") if r else None
            add(f"e2e: {label} tokens/s x AdamW at batch {cfg.batch} x {cfg.seq}", f">= {GOALS['e2e_x_adamw']}",
                x, None if x is None else x >= GOALS["e2e_x_adamw"],
                f"AdamW {ANCHORS['e2e_adamw_fused_tokens_per_s']} tokens/s, galore-torch "
                f"{ANCHORS['e2e_galore_torch_r512_tokens_per_s']} (H100)")
    if "maxbatch" in sections:
        for r in sections["maxbatch"]["rows"]:
            if r["optimizer"] == "adamw-fused":
                continue
            x = r.get("tokens_x_adamw") if r.get("status") == "ok" else None
            add(f"equal memory: {r['optimizer']} tokens/s at its largest batch x AdamW at its largest",
                f">= {GOALS['maxbatch_x_adamw']}", x, None if x is None else x >= GOALS["maxbatch_x_adamw"])
    if "7b" in sections:
        r = sections["7b"]["rows"][0]
        bar = GOALS["7b_gpu_gib"] * GIB
        peak = r.get("peak_bytes")
        met = None
        if r.get("status") == "OOM":
            met = False
        elif r.get("status") == "ok" and peak is not None:
            met = peak <= bar
        add(f"7b: {optimizer_7b} trains on one {GOALS['7b_gpu_gib']} GB GPU at batch {cfg.batch_7b} x {cfg.seq_7b}",
            f"no OOM under a limit <= {GOALS['7b_gpu_gib']} GiB", None if peak is None else f"peak {peak / GIB:.2f} GiB",
            met, None if limit_bytes is None else f"memory limit {limit_bytes / GIB:.1f} GiB")
    if "memory" in sections:
        for r in sections["memory"]["rows"]:
            if r.get("status") != "ok":  # a run that did not fit has no peak to compare
                continue
            x = r.get("peak_x_estimate")
            add(f"memory: {r['scale']} {r['run']} measured peak / estimate", f"within {GOALS['memory_error']:.0%}",
                x, None if x is None else abs(x - 1) <= GOALS["memory_error"])
    for g in out:
        g["evidence"] = cfg.cuda and not cfg.tiny
    return out


def _brief(row: dict, key: str) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')} {row.get('note') or row.get('message') or ''}".strip()
    value = row.get(key)
    return f"{key}={value:.4g}" if isinstance(value, (int, float)) else "ok"


def _fmt_measured(value) -> str:
    return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


# -- main ---------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    """Comma-separated labels; commas inside a label's ``[...]`` stay in it."""
    return [x.strip() for x in re.split(r",(?![^\[]*\])", text) if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 2-3 steps, small batches: checks the logic")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {SECTIONS}")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gpu_suite.json"),
                   help="JSON path; the tables go beside it (.md)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"),
                   help="folder of wheels for missing packages (default: .whl at the repo root)")
    p.add_argument("--site", default=str(ROOT / "runs" / "bench" / "site"), help="where those wheels are installed")
    p.add_argument("--rank", type=int, default=None, help="rank at 1B (default 512; tiny 8)")
    p.add_argument("--rank-7b", type=int, default=None, help="rank at 7B (default 1024, the GaLore paper's; tiny 16)")
    p.add_argument("--gap", type=int, default=None,
                   help="update_proj_gap = the measured refresh cycle (default 200; tiny 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-optimizers", default=",".join(STEP_OPTIMIZERS),
                   help="step section rows: adamw-fused, adamw-foreach, galore-torch, adam-mini, or a distopt optimizer "
                        "(distopt:adam-mini for ours)")
    p.add_argument("--flagship", default="galore,adapm-mini", help="our optimizers in the e2e section and the goals")
    p.add_argument("--maxbatch-optimizers", default="adamw-fused,galore")
    p.add_argument("--batch", type=int, default=None, help="e2e batch (default 8; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="e2e and max-batch sequence length (default 1024; tiny 32)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed steps after the first (default 10; tiny 2)")
    p.add_argument("--maxbatch-cap", type=int, default=None, help="largest batch tried (default 512; tiny 4)")
    p.add_argument("--maxbatch-try-steps", type=int, default=2, help="training steps per batch tried")
    p.add_argument("--optimizer-7b", default="galore", help="our optimizer at 7B (default galore)")
    p.add_argument("--adamw-7b", default="fused,layerwise",
                   help="AdamW rows at 7B: fused (fp32 master weights, autocast) and/or layerwise (bf16 weights, "
                        "layer-wise, checkpointing, like ours); empty for none")
    p.add_argument("--batch-7b", type=int, default=1)
    p.add_argument("--seq-7b", type=int, default=None, help="default 2048; tiny 64")
    p.add_argument("--steps-7b", type=int, default=None, help="timed steps after the first (default 4; tiny 2)")
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="cap this process's GPU memory at this many GiB where the GPU is larger (an H200 then stands "
                        "in for an 80 GB GPU); 0 for the whole GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own; 1 with --device cpu --tiny)")
    p.add_argument("--tf32-step", action="store_true", help="TF32 matmuls in the step section (off, as the anchors)")
    p.add_argument("--impl", default="auto", choices=("auto", "hf", "native"),
                   help="model for training sections: hf (LlamaForCausalLM), native (TinyLlama); auto = hf if installed")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu --tiny to check the logic)")
    sections = _csv(args.sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    flagship, step_rows, max_rows = _csv(args.flagship), _csv(args.step_optimizers), _csv(args.maxbatch_optimizers)
    bad = check_labels(step_rows + flagship + max_rows + [args.optimizer_7b])
    if bad:
        parser.error(f"unknown optimizers {bad}; use {PEER_ROWS} or one of {distopt.list_optimizers()}")
    if distopt_name(args.optimizer_7b) is None:
        parser.error("--optimizer-7b must be a distopt optimizer (the layer-wise mode needs one)")
    adamw_7b = _csv(args.adamw_7b)
    if set(adamw_7b) - {"fused", "layerwise"}:
        parser.error("--adamw-7b takes fused and/or layerwise")

    notes: list[str] = []
    started = time.perf_counter()
    versions = ensure_peers(Path(args.wheels), Path(args.site), notes)
    from distopt.job.modeling import resolve_impl

    impl = args.impl
    if impl == "hf" and versions["transformers"] is None:
        parser.error("--impl hf: transformers is not installed and no wheel provided it")
    impl = resolve_impl(impl)
    if impl == "native":
        notes.append("training sections use distopt.models.TinyLlama (same names and shapes), not LlamaForCausalLM")
    tiny = args.tiny
    one_b, seven_b = _shapes(tiny)
    cfg = Config(
        device=args.device, tiny=tiny, shape_1b=one_b, shape_7b=seven_b,
        rank=args.rank or (8 if tiny else 512), rank_7b=args.rank_7b or (16 if tiny else 1024),
        gap=args.gap or (3 if tiny else 200), lr=args.lr, seed=args.seed,
        batch=args.batch or (2 if tiny else 8), seq=args.seq or (32 if tiny else 1024),
        e2e_steps=args.e2e_steps or (2 if tiny else 10), maxbatch_cap=args.maxbatch_cap or (4 if tiny else 512),
        maxbatch_try_steps=args.maxbatch_try_steps, batch_7b=args.batch_7b, seq_7b=args.seq_7b or (64 if tiny else 2048),
        steps_7b=args.steps_7b or (2 if tiny else 4), impl=impl, tf32_step=args.tf32_step,
    )
    threads = args.threads or (1 if tiny and not cuda else None)
    if threads:
        torch.set_num_threads(threads)
    env = environment(args.device)
    limit = None
    if cuda:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        limit = total
        if args.gpu_gib and total > args.gpu_gib * GIB:
            torch.cuda.set_per_process_memory_fraction(args.gpu_gib * GIB / total)
            limit = int(args.gpu_gib * GIB)
            notes.append(f"GPU memory capped at {args.gpu_gib:g} GiB of {total / GIB:.1f} GiB")
        env.update(gpu_total_bytes=total, memory_limit_bytes=limit)
    if not cuda:
        notes.append("CPU: peak memory is not measured (None); max_rss_bytes is the process's peak resident set")
    if tiny:
        notes.append("tiny shapes: checks the logic only; these figures are no evidence for the goals")

    # `timeout` stops with SIGTERM: raise it as SystemExit so the finished rows are saved.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out)
    payload = {"benchmark": "gpu_suite", "env": env, "peers": versions, "anchors_h100": ANCHORS, "goals_targets": GOALS,
               "settings": {"tiny": tiny, "rank": cfg.rank, "rank_7b": cfg.rank_7b, "gap": cfg.gap, "lr": cfg.lr,
                            "model": impl, "flagship": flagship, "sections": sections, "gpu_gib_cap": args.gpu_gib},
               "notes": notes, "sections": {}, "goals": []}
    markdown = [f"# GPU suite: {env['device_name']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
                + (" | CPU/tiny: not evidence for the goals" if tiny or not cuda else "")]

    def save():
        payload["elapsed_s"] = time.perf_counter() - started
        write_json(out, payload)
        out.with_suffix(".md").write_text("\n\n".join(markdown) + "\n")

    runners = {
        "step": lambda: section_step(cfg, step_rows),
        "e2e": lambda: section_e2e(cfg, ["adamw-fused", *flagship]),
        "maxbatch": lambda: section_maxbatch(cfg, max_rows),
        "7b": lambda: section_7b(cfg, args.optimizer_7b, adamw_7b),
        "memory": lambda: section_memory(cfg, flagship, args.optimizer_7b, adamw_7b),
    }
    for name in SECTIONS:  # always in this order: memory reuses the e2e and 7b runs
        if name not in sections:
            continue
        print(f"[{name}]", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        try:
            result = runners[name]()
        except (KeyboardInterrupt, SystemExit):  # keep what finished when stopped (Ctrl-C, `timeout`)
            done = [{k: v for k, v in r.items() if k != "tried"} for r in _running_rows]
            payload["sections"][name] = {"rows": done, "stopped": True, "elapsed_s": time.perf_counter() - tic}
            notes.append(f"stopped during section {name}: {len(done)} row(s) finished, kept without ratios")
            lines = [f"- {r.get('optimizer') or r.get('run')}: {_brief(r, 'mean_ms' if name == 'step' else 'tokens_per_s')}"
                     for r in done]
            markdown.append(f"## {name} (stopped: finished rows only)\n\n" + "\n".join(lines))
            save()
            raise
        result["elapsed_s"] = time.perf_counter() - tic
        payload["sections"][name] = result
        markdown.append(f"## {name}\n\n{result['markdown']}")
        print(f"\n## {name}\n\n{result['markdown']}\n", flush=True)
        save()

    payload["goals"] = goals(cfg, payload["sections"], flagship, args.optimizer_7b, limit)
    gtable = markdown_table(
        [{**g, "measured": _fmt_measured(g["measured"]), "met": {True: "yes", False: "no", None: ""}[g["met"]],
          "anchor": g["anchor"] or ""} for g in payload["goals"]],
        [("goal", "goal", "s"), ("target", "target", "s"), ("measured", "measured", "s"), ("met", "met", "s"),
         ("anchor", "anchor", "s")])
    label = "goals" + ("" if cuda and not tiny else " (CPU/tiny: not evidence)")
    markdown.append(f"## {label}\n\n{gtable}")
    print(f"## {label}\n\n{gtable}\n")
    if notes:
        print("notes:\n" + "\n".join(f"  - {n}" for n in notes))
    save()
    print(f"JSON: {out}  tables: {out.with_suffix('.md')}  ({payload['elapsed_s']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
