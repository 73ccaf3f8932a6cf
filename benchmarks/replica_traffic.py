"""Replicate (inter-node) gradient traffic of the matrices: DDP's full all-reduce against the
projected sync (``distopt.engines.ddp``), from ``distopt.core.comm``'s counter.

Gloo ranks on CPU hold one LLaMA decoder layer's seven matrices with fixed random gradients, whole
(DDP) or row-sharded inside replica groups (``--hsdp R``: FSDP2 on the shard sub-mesh), and the
optimizer averages their projections over the replicas. Counted per rank, in bytes handed to the
replicate all-reduce (fp32):
- the first step (every matrix takes its first basis: sketches, then the projection);
- a plain step (the projections only);
- amortized over a refresh cycle of ``--gap`` steps: each matrix refreshes once per cycle, so
  ``plain + (first - plain) / gap`` (a warm refresh draws as many sketch columns as a cold one);
against the full sync, ``4 m n`` per matrix per step (HSDP: this rank's rows of it). Then per model on paper: the same per-layer
figures times the layers (the embeddings and LM head stay on the full sync in both columns and are
left out).

    python benchmarks/replica_traffic.py --shapes 7b --rank 256             # DDP, 4 ranks
    python benchmarks/replica_traffic.py --shapes 7b --rank 256 --hsdp 2    # HSDP 2 x 2
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
    if args.hsdp:  # (replicas, shards): each replica group an FSDP2 run on its shard sub-mesh
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (args.hsdp, world // args.hsdp), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh["shard"])
        replicas = mesh.get_group("replicate")
    else:
        replicas = dist.group.WORLD
    optimizer = distopt.build_optimizer(model, args.optimizer, rank=args.rank, update_proj_gap=args.gap)
    synced = optimizer.sync_by_projection(replicas)
    generator = torch.Generator().manual_seed(rank)
    counts = []
    for _ in range(2):
        for p in synced:
            if args.hsdp:
                shard = torch.randn(p.to_local().shape, generator=generator)
                p.grad = DTensor.from_local(shard, mesh["shard"], [Shard(0)], shape=p.shape, stride=p.stride())
            else:
                p.grad = torch.randn(p.shape, generator=generator)
        comm.reset_traffic()
        optimizer.step()
        counts.append(comm.traffic()["bytes"].get("replica_all_reduce", 0))
    # What the engine's full sync all-reduces across replicas per rank: its shard of each gradient.
    full = sum(4 * (p.to_local().numel() if args.hsdp else p.numel()) for p in synced)
    shapes = [tuple(p.shape) for p in synced]
    r_over_d = sum(args.rank * max(s) for s in shapes) / sum(s[0] * s[1] for s in shapes)
    if rank == 0:
        queue.put({"first": counts[0], "plain": counts[1], "full": full, "matrices": len(synced), "r_over_d": r_over_d})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--optimizer", default="galore")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--hsdp", type=int, default=0, metavar="REPLICAS",
                        help="HSDP with this many replica groups (ranks / REPLICAS shards each); 0: DDP")
    parser.add_argument("--out", default="runs/bench/replica_traffic.json")
    args = parser.parse_args(argv)
    if args.hsdp < 0 or (args.hsdp and args.ranks % args.hsdp):
        parser.error(f"--hsdp {args.hsdp}: the replica groups must divide --ranks {args.ranks} "
                     f"(use one of {[d for d in range(1, args.ranks + 1) if args.ranks % d == 0]}, or 0 for DDP)")
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
           "layout": f"hsdp {args.hsdp} x {args.ranks // args.hsdp}" if args.hsdp else f"ddp x {args.ranks}",
           "matrices_per_layer": got["matrices"], "full_bytes_per_layer": got["full"],
           "first_step_bytes_per_layer": got["first"], "plain_step_bytes_per_layer": got["plain"],
           "amortized_bytes_per_layer": round(amortized), "amortized_x_full": amortized / got["full"],
           "r_over_d_weighted": got["r_over_d"], "model_layers": layers,
           "model_full_bytes_per_step": got["full"] * layers, "model_projected_bytes_per_step": round(amortized * layers)}
    print(markdown_table([row], [
        ("shapes", "shapes", ""), ("layout", "layout", ""), ("rank", "r", ""), ("gap", "gap", ""),
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
