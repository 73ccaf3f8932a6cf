"""Finding this process's rank, and starting the process group.

Launchers and what they leave in the environment:
- torchrun, the DeepSpeed launcher, accelerate: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``.
- ``mpirun`` (Open MPI, MPICH, Intel MPI) and ``srun --mpi=pmix``: ranks come from mpi4py when it is
  installed (rank 0 then broadcasts its host and a free port); without mpi4py, from
  ``OMPI_COMM_WORLD_*`` or ``PMI_*`` plus ``MASTER_ADDR``.
- ``srun`` alone: ``SLURM_PROCID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS``), ``SLURM_LOCALID``;
  the master is ``MASTER_ADDR`` or else the first host of the step's node list, and the port
  ``MASTER_PORT`` or else one derived from the job id.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env, *names, default=None):
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm node list (``gpu[01-03,7],login1``) like ``scontrol show hostnames``."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_mpi(env) -> DistInfo | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    slurm_tasks = _int(env, "SLURM_STEP_NUM_TASKS", default=1)
    if size == 1 and slurm_tasks > 1:
        raise RuntimeError(
            f"mpi4py sees 1 rank but this Slurm step has {slurm_tasks} tasks: srun's --mpi plugin "
            "(pmix, pmi2) does not match the MPI that mpi4py was built against"
        )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = local.Get_size() == size
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else socket.gethostname())
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
    addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
    return DistInfo(rank, size, local.Get_rank(), local.Get_size(), addr, port, "mpi")


def discover(env=None) -> DistInfo:
    """This process's place in the job, from the launcher's environment."""
    env = os.environ if env is None else env
    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        world = int(env["WORLD_SIZE"])
        return DistInfo(
            int(env["RANK"]), world, _int(env, "LOCAL_RANK", default=0), _int(env, "LOCAL_WORLD_SIZE", default=world),
            env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=29500), launcher,
        )
    mpi_world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if mpi_world is not None or "PMIX_RANK" in env or env.get("DISTOPT_LAUNCHER") == "mpi":
        info = _from_mpi(env)
        if info is not None:
            return info
        if mpi_world is not None:
            if "MASTER_ADDR" not in env:
                raise RuntimeError("launched by mpirun without mpi4py: set MASTER_ADDR (and MASTER_PORT), or pip install 'distopt[mpi]'")
            return DistInfo(
                _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0), mpi_world,
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=1),
                env["MASTER_ADDR"], _int(env, "MASTER_PORT", default=29500), "mpi",
            )
    # Inside an srun step (not the batch script itself, which has no step id).
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    if step != "" and world > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or expand_hostlist(nodes)[0]
        job = _int(env, "SLURM_JOB_ID", "SLURM_JOBID", default=0)
        port = _int(env, "MASTER_PORT", default=20000 + job % 20000)
        local_size = _int(env, "SLURM_NTASKS_PER_NODE", default=0) or max(1, world // _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1))
        return DistInfo(int(env["SLURM_PROCID"]), world, _int(env, "SLURM_LOCALID", default=0), local_size, addr, port, "slurm")
    return DistInfo()


def pick_device(requested: str, info: DistInfo) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but torch sees no CUDA device")
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


_started = False


def started() -> bool:
    """Whether this process has started a process group through :func:`init`."""
    return _started


def init(info: DistInfo, device: torch.device, backend: str = "auto", timeout_min: float = 30) -> None:
    """Start the default process group for a multi-process job (no-op for one process)."""
    global _started
    if not info.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    _started = True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cpu_threads(info: DistInfo) -> int:
    """Threads per rank on CPU: the cores this process may use, split among the ranks on the node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, info.local_world_size))
