"""Spawn gloo ranks on CPU and collect what each returns (dion's pattern: results travel through
files, so an assertion failing on one rank cannot hang the others)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    path = os.path.join(outdir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)  # whole or absent: the parent may read it while this rank tears down
    try:
        if "ok" in result:
            # Tear down together: a rank that exits while another still uses the group can abort it
            # ("terminate called without an active exception"). A failed rank skips this, so the
            # others' barrier fails at once instead of waiting for it.
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        files = [os.path.join(outdir, f"rank{rank}.pt") for rank in range(world_size)]
        while True:
            try:
                if ctx.join(timeout=5):
                    break
            except mp.ProcessExitedException:
                # A rank that dies after every rank wrote its result died tearing down the group
                # (gloo can abort there when the ranks leave at different times): the results stand.
                if all(os.path.exists(f) for f in files):
                    for process in ctx.processes:
                        process.join(timeout=30)
                    break
                raise
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout:.0f} s (a collective hang?)")
        results = []
        for rank in range(world_size):
            res = torch.load(files[rank], weights_only=False)
            if "error" in res:
                raise AssertionError(f"rank {rank} failed:\n{res['error']}")
            results.append(res["ok"])
        return results
