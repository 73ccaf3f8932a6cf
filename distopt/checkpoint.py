"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), resumable on another world size.

The optimizer's state dict is keyed by parameter name; under FSDP2 its row-sharded tensors are
DTensors with the parameter's placement, so DCP writes each rank's rows once and reads back exactly
the rows a new layout needs (2 ranks -> 3 ranks -> 1 process). Replicated tensors are written once.

A checkpoint is written into ``<path>.tmp`` and renamed to ``<path>`` only after every rank has
finished, so a save killed midway never leaves a directory that loads as valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .optim.base import SubspaceOptimizer

COMPLETE_MARKER = ".distopt-complete"


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """DCP-ready optimizer state: distopt's name-keyed dict, or torch's for other optimizers."""
    if isinstance(optimizer, SubspaceOptimizer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as torch_get

    return torch_get(model, optimizer)


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    if isinstance(optimizer, SubspaceOptimizer):
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    torch_set(model, optimizer, state_dict)


def _header(optim_state: dict) -> str:
    """What must match for a checkpoint to load, as one string (read before any tensor)."""
    meta = optim_state.get("distopt", {"algorithm": "torch", "shape_hparams": []})
    return json.dumps({"algorithm": meta["algorithm"], "shape_hparams": meta["shape_hparams"]}, sort_keys=True)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def save(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> Path:
    """Write model, optimizer and ``extra`` (plain values and tensors) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_main() and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    optim_state = get_optimizer_state_dict(model, optimizer)
    state = {"model": get_model_state_dict(model), "optim": optim_state, "extra": extra or {},
             "header": _header(optim_state)}
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()
    return path


def load(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> dict:
    """Load a checkpoint written by :func:`save`, on any world size; returns ``extra``.

    The optimizer must be built with the same algorithm and state-shaping hyper-parameters
    (rank, side); a mismatch is refused before any tensor is read.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete distopt checkpoint (no {COMPLETE_MARKER}): the save that wrote it did "
            "not finish. Resume from an earlier checkpoint."
        )
    optim_state = get_optimizer_state_dict(model, optimizer)
    mine = _header(optim_state)
    header = {"header": ""}
    dcp.load(header, checkpoint_id=str(path))
    if header["header"] != mine:
        saved, want = json.loads(header["header"]), json.loads(mine)
        raise ValueError(
            f"checkpoint {path} holds optimizer {saved['algorithm']!r} with {saved['shape_hparams']}, but this "
            f"optimizer is {want['algorithm']!r} with {want['shape_hparams']}; build it with the checkpoint's "
            "algorithm and shape hyper-parameters (rank, side) to resume"
        )
    state = {"model": get_model_state_dict(model), "optim": optim_state, "extra": dict(extra or {})}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]
