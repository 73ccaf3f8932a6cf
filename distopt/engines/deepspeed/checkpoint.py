"""Checkpoints: merging ZeRO's per-rank files into one resumable on any data-parallel size, and
loading it."""

from __future__ import annotations

import glob
import importlib
import logging
import os
import pickle
import re

import torch

from .names import ADAPTER, CONVERT_HINT, FULL_FORMAT

logger = logging.getLogger("distopt")



# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _resolve_tag(load_dir: str, tag) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{load_dir}: no 'latest' file; pass the checkpoint tag")
    with open(latest) as f:
        return f.read().strip()


def saved_dp_world_size(load_dir: str, tag=None) -> int:
    """Data-parallel size a DeepSpeed checkpoint was written with (its per-rank optimizer files)."""
    folder = os.path.join(load_dir, _resolve_tag(load_dir, tag))
    ranks = {int(m.group(1)) for f in glob.glob(os.path.join(folder, "*optim_states.pt"))
             if (m := _OPTIM_FILE.search(os.path.basename(f)))}
    if not ranks:
        raise FileNotFoundError(f"{folder}: no ZeRO optimizer files (*zero_pp_rank_*_mp_rank_00_optim_states.pt)")
    return max(ranks) + 1


def _guard_checkpoint_loading(engine) -> None:
    """Wrap ``engine.load_checkpoint`` so a checkpoint of another data-parallel size is refused
    before anything is loaded, with the conversion that makes it work."""
    import inspect

    original = engine.load_checkpoint
    signature = inspect.signature(original)

    def load_checkpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        load_dir, tag = bound.arguments["load_dir"], bound.arguments["tag"]
        with_optimizer = bound.arguments["load_optimizer_states"] and not bound.arguments["load_module_only"]
        if with_optimizer and (tag is not None or os.path.isfile(os.path.join(load_dir, "latest"))):
            saved = saved_dp_world_size(load_dir, tag)
            current = engine.seq_dp_world_size
            if saved != current:
                raise ValueError(
                    f"checkpoint {load_dir} (tag {_resolve_tag(load_dir, tag)}) was written by {saved} data-parallel "
                    f"ranks and this run has {current}. ZeRO partitions, and distopt's row-sharded state, do not "
                    "carry over between sizes. Fix: " + CONVERT_HINT.format(ckpt=load_dir)
                )
        return original(*args, **kwargs)

    load_checkpoint.__doc__ = original.__doc__
    engine.load_checkpoint = load_checkpoint


def _distopt_state(optim_file_state: dict) -> dict:
    inner = optim_file_state["optimizer_state_dict"]
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        value = inner.get(key)
        if isinstance(value, dict) and "distopt" in value:
            return value
    raise ValueError("this ZeRO checkpoint does not hold a distopt optimizer state (was it written by "
                     "distopt.deepspeed.initialize?)")


def _model_states_file(folder: str) -> str:
    for pattern in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(folder, pattern)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no model states file")


def merge_states(states: list[dict]) -> dict:
    """One name-keyed optimizer state with whole tensors from every rank's distopt state dict."""
    metas = [s["distopt"]["engine"] for s in states]
    order = sorted(range(len(states)), key=lambda i: metas[i]["dp_rank"])
    states = [states[i] for i in order]
    metas = [metas[i] for i in order]
    if [m["dp_rank"] for m in metas] != list(range(len(states))) or metas[0]["dp_world_size"] != len(states):
        raise ValueError(f"need the optimizer state of every rank 0..{metas[0]['dp_world_size'] - 1}, got ranks "
                         f"{[m['dp_rank'] for m in metas]}")
    full = {}
    for name, lay in metas[0]["layout"].items():
        entries = {}
        for key, first in states[0]["state"][name].items():
            pieces = [s["state"][name][key] for s in states]
            if lay["kind"] == "adamw" and first.dim() >= 1:
                flat = torch.cat([p.reshape(-1) for p in pieces])
                entries[key] = flat.reshape(lay["shape"])
            elif lay["kind"] == "matrix" and key in lay["row_keys"]:
                entries[key] = torch.cat(pieces, dim=0)
                if entries[key].shape[0] != lay["shape"][0]:
                    raise ValueError(f"{name}.{key}: row blocks add up to {entries[key].shape[0]} rows, not {lay['shape'][0]}")
            elif lay["kind"] == "matrix" and key in lay.get("chunk_keys", ()):  # per-rank chunks, in rank order
                entries[key] = torch.cat(pieces, dim=lay.get("chunk_dims", {}).get(key, 0))
            else:
                entries[key] = first.clone()
        full[name] = entries
    meta = dict(states[0]["distopt"])
    meta["engine"] = {"adapter": ADAPTER, "full": True, "source_dp_world_size": len(states),
                      "source_stage": metas[0]["stage"]}
    return {"state": full, "param_groups": states[0]["param_groups"], "distopt": meta}


# Plain data holders DeepSpeed pickles into its checkpoint files: allowed when loading them with
# ``weights_only=True``. Anything else in a file is refused by name, never unpickled.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def safe_load(path: str, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` that also accepts DeepSpeed's own plain-data classes
    (:data:`DEEPSPEED_SAFE_GLOBALS`). A file holding any other object is refused, naming it.
    ``mmap=True`` maps the tensors from the file instead of reading them into memory."""
    allowed = [c for c in map(_resolve, DEEPSPEED_SAFE_GLOBALS) if c is not None]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            others = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(DEEPSPEED_SAFE_GLOBALS))
            raise ValueError(
                f"{path} holds objects of {others or 'unknown classes'}, which distopt does not unpickle: it loads "
                "checkpoint files with weights_only=True, so that a file cannot run code. If you trust this file and "
                "these classes are plain data, add them with torch.serialization.add_safe_globals([...]) and retry"
            ) from None


def convert_checkpoint(load_dir: str, out: str, tag=None) -> str:
    """Write one file with everything needed to resume a distopt DeepSpeed checkpoint on any
    data-parallel size: fp32 weights by name, the whole optimizer state by name, the LR scheduler,
    the engine's step counters and the client state. Load it with :func:`load_full_state`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _resolve_tag(load_dir, tag)
    folder = os.path.join(load_dir, tag)
    world = saved_dp_world_size(load_dir, tag)
    states = []
    for rank in range(world):
        matches = [f for f in glob.glob(os.path.join(folder, f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))]
        if len(matches) != 1:
            raise FileNotFoundError(f"{folder}: expected one optimizer file of rank {rank}, found {matches}")
        states.append(_distopt_state(safe_load(matches[0], mmap=True)))  # mapped: merged without a second copy
    optimizer = merge_states(states)
    # Every file DeepSpeed's zero_to_fp32 unpickles has now passed a weights_only load here.
    model_states = safe_load(_model_states_file(folder))
    weights = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    weights = {k: v.detach().clone().float() for k, v in weights.items()}
    engine_keys = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
    known = set(engine_keys) | {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                                "shared_params", "frozen_param_fragments", "dp_world_size", "mp_world_size",
                                "ds_config", "ds_version", "data_sampler", "random_ltd", "sparse_tensor_module_names"}
    blob = {
        "format": FULL_FORMAT, "version": 1, "tag": tag, "source_dp_world_size": world,
        "model": weights, "optimizer": optimizer,
        "engine": {k: model_states.get(k) for k in engine_keys},
        "client_state": {k: v for k, v in model_states.items() if k not in known},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out)
    return out


def load_full_state(engine, path: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True) -> dict:
    """Resume from a file written by :func:`convert_checkpoint`, on any data-parallel size.

    Sets this rank's fp32 master partitions and the model's working weights, this rank's rows and
    elements of the optimizer state, the LR scheduler and the engine's step counters. Returns the
    client state saved with the checkpoint. The file is memory-mapped: each rank reads its share,
    so the ranks of a node do not each hold the whole merged state in host memory."""
    blob = safe_load(path, mmap=True)
    if blob.get("format") != FULL_FORMAT:
        raise ValueError(f"{path} was not written by `python -m distopt.deepspeed convert`")
    optimizer = engine.basic_optimizer
    binding = getattr(optimizer, "binding", None)
    if binding is None:
        raise ValueError("this engine was not built by distopt.deepspeed.initialize")
    binding.load_weights(engine, blob["model"])
    if load_optimizer_states:
        optimizer.load_state_dict(blob["optimizer"])
    state = blob["engine"]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if state.get(key) is not None:
            setattr(engine, key, state[key])
    return blob["client_state"]


