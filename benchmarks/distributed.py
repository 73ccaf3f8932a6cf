"""Sharded GaLore under FSDP2: per-rank state memory, distopt's own traffic, refresh time.

For each world size it spawns gloo ranks (CPU) or NCCL ranks (one per GPU), shards LLaMA-shaped
decoder layers with ``fully_shard``, and measures:
- ``state_bytes`` per rank, split into row-sharded state and replicated state (right bases);
- bytes of distopt's collectives per optimizer step over one refresh cycle (``--gap`` steps), as
  counted by ``distopt.core.comm``, against FSDP2's own traffic for the same matrices
  (parameters all-gathered for forward and backward, gradients reduce-scattered: 3 x fp32 bytes);
- the time of a full refresh cycle (every matrix refreshed in one optimizer step: ``stagger=False``).
Embeddings and the LM head are left out on both sides (a tiny vocabulary); counting them would
only lower distopt's share of the traffic.

    python benchmarks/distributed.py                               # 1 and 2 CPU ranks, 60M shapes
    python benchmarks/distributed.py --shapes 1b --layers 1 --rank 512 --gap 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, markdown_table, write_json  # noqa: E402
from step_time import SHAPES  # noqa: E402

import distopt  # noqa: E402
from distopt.core import comm  # noqa: E402
from distopt.models import LlamaShape, TinyLlama  # noqa: E402


def _rank_main(rank, world_size, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // world_size))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = SHAPES[args.shapes]
    shape = LlamaShape(**{**base.__dict__, "num_hidden_layers": args.layers, "vocab_size": 256})
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyLlama(shape)
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = distopt.build_optimizer(model, "galore", rank=args.rank, update_proj_gap=args.gap, side=args.side,
                                  refresh=args.refresh, shard_basis=args.shard_basis)
    opt.allocate_state()
    matrices = [p for g in opt.param_groups if g["kind"] == "matrix" for p in g["params"]]
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    sharded = replicated = 0
    for p in matrices:
        rows = opt._distributed_keys(p, group) if opt._views[p].sharded else {}
        for key, t in opt.state[p].items():
            nbytes = t.numel() * t.element_size()
            if key in rows or not opt._views[p].sharded:
                sharded += nbytes
            else:
                replicated += nbytes
    matrix_param_bytes = sum(opt._views[p].m * opt._views[p].n * 4 for p in matrices)

    ids = torch.randint(0, 256, (1, 16), device=device)
    model(ids, ids).backward()
    grads = {p: p.grad for p in matrices}
    for p in model.parameters():
        if p not in grads:
            p.grad = None
    opt.step()  # every matrix takes its first basis here
    comm.reset_traffic()
    start = time.perf_counter()
    for _ in range(args.gap):
        opt.step()  # fixed gradients: the cycle's traffic and refreshes, without forward/backward
    if cuda:
        torch.cuda.synchronize()
    cycle_s = time.perf_counter() - start
    traffic = comm.traffic()["bytes"]

    # A full refresh cycle done at once, through the optimizer's own step: with stagger off and a gap
    # of 2, every matrix refreshes on even steps; a refresh step minus the plain step after it is the
    # time of refreshing every matrix (warm-started, with the moments mapped).
    full = distopt.build_optimizer(model, "galore", rank=args.rank, update_proj_gap=2, side=args.side,
                                   refresh=args.refresh, shard_basis=args.shard_basis, stagger=False)
    for _ in range(2):  # the first bases, then a plain step: timing starts on a warm-started refresh
        full.step()
    refresh_times = []
    for _ in range(args.refresh_repeats):
        times = []
        for _ in range(2):  # a refresh step, then a plain one
            dist.barrier()
            start = time.perf_counter()
            full.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        refresh_times.append(times[0] - times[1])
    refresh_s = min(refresh_times)
    row = {
        "world_size": world_size, "rank": rank, "state_bytes": distopt.state_bytes(opt),
        "matrix_state_bytes": sharded + replicated, "replicated_bytes": replicated, "sharded_bytes": sharded,
        "distopt_bytes_per_step": sum(traffic.values()) / args.gap, "traffic_by_kind": traffic,
        "fsdp_bytes_per_step": 3 * matrix_param_bytes, "cycle_s": cycle_s, "full_refresh_s": refresh_s,
    }
    torch.save(row, os.path.join(out, f"r{world_size}_{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--shapes", default="60m", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (traffic and memory scale per layer)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--side", default="right", choices=["auto", "left", "right"],
                        help="right keeps every per-step product shard-local under FSDP2")
    parser.add_argument("--refresh", default="randomized", choices=["randomized", "svd", "random"])
    parser.add_argument("--refresh-repeats", type=int, default=2, help="full refresh cycles timed (the fastest is kept)")
    parser.add_argument("--shard-basis", action="store_true", help="split right bases over the ranks too")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per rank (0: the cores divided by the ranks). 1 gives every world size one core "
                             "per rank, so the refresh speed-up measures parallelism rather than a shared core count")
    parser.add_argument("--out", default="runs/bench/distributed.json")
    args = parser.parse_args(argv)
    if args.refresh_repeats < 1:
        parser.error(f"--refresh-repeats {args.refresh_repeats}: time at least one refresh cycle (e.g. 2)")
    import tempfile

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "distributed"))
    from harness import free_port

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world_size in [int(w) for w in args.world_sizes.split(",")]:
            print(f"running {world_size} rank(s)...", file=sys.stderr)
            mp.start_processes(_rank_main, args=(world_size, free_port(), args, out), nprocs=world_size,
                               start_method="spawn")
            rows += [torch.load(os.path.join(out, f"r{world_size}_{r}.pt"), weights_only=False) for r in range(world_size)]
    single = next((r for r in rows if r["world_size"] == 1), None)
    for row in rows:
        row["traffic_share"] = row["distopt_bytes_per_step"] / row["fsdp_bytes_per_step"]
        if single:
            ideal = single["matrix_state_bytes"] / row["world_size"]
            row["sharded_vs_ideal"] = (row["sharded_bytes"]) / (ideal - row["replicated_bytes"] / row["world_size"]) \
                if row["world_size"] > 1 else 1.0
            row["memory_goal_ratio"] = (single["matrix_state_bytes"] / row["world_size"]) / row["matrix_state_bytes"]
            row["refresh_speedup"] = single["full_refresh_s"] / row["full_refresh_s"]
    payload = {"benchmark": "distributed", "env": environment(args.device), "settings": vars(args), "results": rows}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [
        ("world_size", "ranks", "d"), ("rank", "rank", "d"), ("matrix_state_bytes", "matrix state B", ",d"),
        ("sharded_bytes", "split over ranks B", ",d"), ("replicated_bytes", "replicated B", ",d"),
        ("memory_goal_ratio", "(1-rank/N) / this", ".3f"), ("distopt_bytes_per_step", "distopt B/step", ",.0f"),
        ("traffic_share", "share of FSDP2 traffic", ".5%"), ("full_refresh_s", "full refresh s", ".3f"),
        ("refresh_speedup", "refresh speed-up", ".2f"),
    ]))
    print(f"\nshapes {args.shapes} x {args.layers} layer(s) | rank {args.rank} | gap {args.gap} | side {args.side} "
          f"| refresh {args.refresh} | shard_basis {args.shard_basis} | JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
