"""Replicate (inter-node) gradient traffic of the matrices: DDP's full all-reduce against the
projected sync (``distopt.engines.ddp``), from ``distopt.core.comm``'s counter.

Gloo ranks on CPU hold one LLaMA decoder layer's seven matrices whole (the data-parallel layout
that crosses nodes) with fixed random gradients, and the optimizer averages their projections over
the ranks. Counted per rank, in bytes handed to the all-reduce (fp32):
- the first step (every matrix takes its first basis: sketches, then the projection);
- a plain step (the projections only);
- amortized over a refresh cycle of ``--gap`` steps: each matrix refreshes once per cycle, so
  ``plain + (first - plain) / gap`` (a warm refresh draws as many sketch columns as a cold one);
against the full sync, ``4 m n`` per matrix per step. Then per model on paper: the same per-layer
figures times the layers (the embeddings and LM head stay on the full sync in both columns and are
left out).

    python benchmarks/replica_traffic.py --shapes 7b --rank 256
    python benchmarks/replica_traffic.py --shapes 1b --rank 512 --ranks 4
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, markdown_table, write_json  # noqa: E402

import distopt  # noqa: E402
from distopt.core import comm  # noqa: E402

SHAPES = {"60m": (512, 1376, 8), "1b": (2048, 5461, 24), "7b": (4096, 11008, 32)}  # hidden, intermediate, layers
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer(hidden: int, intermediate: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.self_attn, model.mlp = torch.nn.Module(), torch.nn.Module()
    for name in NAMES[:4]:
        setattr(model.self_attn, name, torch.nn.Linear(hidden, hidden, bias=False))
    model.mlp.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
    model.mlp.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
    model.mlp.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
    return model


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, intermediate, _ = SHAPES[args.shapes]
    model = layer(hidden, intermediate)
    optimizer = distopt.build_optimizer(model, args.optimizer, rank=args.rank, update_proj_gap=args.gap)
    synced = optimizer.sync_by_projection(dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    counts = []
    for _ in range(2):
        for p in synced:
            p.grad = torch.randn(p.shape, generator=generator)
        comm.reset_traffic()
        optimizer.step()
        counts.append(comm.traffic()["bytes"].get("replica_all_reduce", 0))
    full = sum(4 * p.numel() for p in synced)
    d = {tuple(p.shape): min(p.shape) for p in synced}
    if rank == 0:
        queue.put({"first": counts[0], "plain": counts[1], "full": full, "matrices": len(synced),
                   "r_over_d": sum(args.rank * 4 * max(s) for s in d) / sum(4 * s[0] * s[1] for s in d)})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--optimizer", default="galore")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/replica_traffic.json")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(args.ranks, port, args, queue), nprocs=args.ranks, start_method="spawn")
    got = queue.get(timeout=5)
    layers = SHAPES[args.shapes][2]
    amortized = got["plain"] + (got["first"] - got["plain"]) / args.gap
    row = {"shapes": args.shapes, "optimizer": args.optimizer, "rank": args.rank, "gap": args.gap, "ranks": args.ranks,
           "matrices_per_layer": got["matrices"], "full_bytes_per_layer": got["full"],
           "first_step_bytes_per_layer": got["first"], "plain_step_bytes_per_layer": got["plain"],
           "amortized_bytes_per_layer": round(amortized), "amortized_x_full": amortized / got["full"],
           "r_over_d_weighted": got["r_over_d"], "model_layers": layers,
           "model_full_bytes_per_step": got["full"] * layers, "model_projected_bytes_per_step": round(amortized * layers)}
    print(markdown_table([row], [
        ("shapes", "shapes", ""), ("rank", "r", ""), ("gap", "gap", ""),
        ("full_bytes_per_layer", "full sync, B/layer/step", ","),
        ("plain_step_bytes_per_layer", "projected, plain step", ","),
        ("first_step_bytes_per_layer", "projected, refresh step", ","),
        ("amortized_bytes_per_layer", "projected, amortized", ","),
        ("amortized_x_full", "amortized x full", ".4f"), ("r_over_d_weighted", "r/d (bytes-weighted)", ".4f")]))
    write_json(args.out, {"env": environment("cpu"), "rows": [row]})
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
