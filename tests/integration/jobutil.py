"""Shared pieces of the training-job tests: a very small model and data, and subprocess launching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

MICRO_MODEL = """\
vocab_size: 256
hidden_size: 32
intermediate_size: 64
num_hidden_layers: 2
num_attention_heads: 2
max_position_embeddings: 64
"""


def micro_model(tmp_path: Path) -> str:
    path = tmp_path / "llama_micro.yaml"
    path.write_text(MICRO_MODEL)
    return str(path)


def job_args(tmp_path: Path, out: str = "run", impl: str = "native", **extra) -> list[str]:
    """Overrides for a job that takes about a second per step on one CPU core, or less.

    Data: a handful of files of the standard library (the embedded default, through a glob)."""
    args = {
        "model.name": micro_model(tmp_path), "model.impl": impl, "data.source": "stdlib", "data.glob": "json/*.py",
        "data.seq_len": 32, "optim.name": "galore", "optim.lr": 0.01, "optim.hparams.rank": 8,
        "optim.hparams.update_proj_gap": 3, "schedule.warmup_steps": 1, "train.steps": 8, "train.batch_size": 4,
        "eval.every": 4, "eval.batches": 2, "log.every": 2, "log.plot": "false", "log.progress": "lines",
        "engine.device": "cpu", "engine.threads": 1, "out_dir": str(tmp_path / out),
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.setdefault("OMP_NUM_THREADS", "1")
    for key in [k for k in e if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))] + ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        e.pop(key, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=kw.pop("env", None) or env(), capture_output=True, text=True, timeout=timeout, **kw)


def python() -> str:
    return sys.executable


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def launch_ranks(world: int, args: list[str], timeout: float = 240, **extra_env) -> list[subprocess.CompletedProcess]:
    """``world`` processes of launch/train.py with the variables torchrun would set; one result per rank."""
    port = free_port()
    procs = [subprocess.Popen([python(), "launch/train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=world,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env))
             for r in range(world)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


def ok(results) -> str:
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results[0].stdout
