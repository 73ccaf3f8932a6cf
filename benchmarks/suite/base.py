"""The GPU suite's shared parts: settings, shapes, row labels and optimizers, device and memory
helpers, and the training run the sections time."""

from __future__ import annotations

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
import traceback
import warnings
from pathlib import Path

import torch
from common import summarize, timed

import distopt
from distopt.engines import layerwise
from distopt.models import LLAMA_1B
from distopt.optim import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("step", "e2e", "maxbatch", "7b", "memory")
# ``[packed=True]``: the model's same-shape weights laid out by distopt.pack_weights first.
STEP_OPTIMIZERS = ("adamw-fused", "galore-torch", "adam-mini", "galore", "galore[packed=True]", "adapm-mini", "grassjump",
                   "subtrack")
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
def model_shapes(tiny: bool):
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


def peer_versions(notes: list[str]) -> dict:
    """The installed version of each comparison package (None where missing), with a note naming
    the command that installs a missing one from local wheels (``docs/benchmarks.md``)."""
    versions = {}
    for module, dist in PEERS.items():
        versions[dist] = None
        if importlib.util.find_spec(module) is not None:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "unknown"
    missing = [dist for dist in ("galore-torch", "adam-mini") if versions[dist] is None]
    if missing:
        notes.append(f"{', '.join(missing)} not installed: their rows are skipped (install from local wheels with "
                     "`pip install --no-index --no-deps --target runs/bench/site .whl/*.whl` and run with "
                     "PYTHONPATH=runs/bench/site; galore-torch also needs bitsandbytes)")
    return versions


class Skip(Exception):
    """A row that cannot run here (a comparison package is missing)."""


def _import_galore_torch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
    except ImportError as err:  # bitsandbytes included: galore_torch imports it for its 8-bit class
        raise Skip(f"galore-torch is not importable ({err})") from None
    return GaLoreAdamW


# -- optimizers ---------------------------------------------------------------------------------
def _takes(name: str, key: str) -> bool:
    return key in inspect.signature(REGISTRY[name].__init__).parameters


def label_hparams(label: str) -> dict:
    """Hyper-parameters a row label sets: ``galore[projection_precision=tf32,rank=256]`` (and
    ``packed=True``: the model's weights laid out by ``distopt.pack_weights`` first)."""
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
    if hparams.pop("packed", False):  # a layout of the model, not an optimizer option
        distopt.pack_weights(model)
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
RUNNING: dict[str, list[dict]] = {"rows": []}  # the running section's finished rows, saved if the run is stopped


def new_rows() -> list[dict]:
    RUNNING["rows"] = []  # a new list: the finished sections keep theirs
    return RUNNING["rows"]


