"""A subspace optimizer under FSDP2: per-rank memory against ``1/N``, distopt's traffic, refresh time.

For each world size it spawns gloo ranks (CPU) or NCCL ranks (one per GPU), shards LLaMA-shaped
decoder layers with ``fully_shard``, and measures:
- ``state_bytes`` per rank: *everything* the optimizer holds (moments, bases, element-wise state,
  step counters), against the ideal, one process's ``state_bytes`` over ``N``; the part that is
  replicated (whole on every rank) is shown too;
- distopt's collective traffic per optimizer step over one refresh cycle (``--gap`` steps), as
  counted by ``distopt.core.comm`` and converted to ring bytes sent per rank, against FSDP2's own
  traffic for the decoder matrices (parameters all-gathered for forward and backward, gradients
  reduce-scattered, at the ``--precision``'s byte sizes);
- the time of a full refresh cycle (every matrix refreshed in one optimizer step: ``stagger=False``);
- the collectives distopt issues on a plain (non-refresh) step, by kind.

It also prints, by formula, the traffic that the partitioned layout adds per step over the
replicated one (an ``n x r`` fp32 all-gather per right basis; the left side's reduce-scatter plus
all-gather equals the all-reduce it replaces) as a share of FSDP2's, at 1B and 7B shapes for
``r = 256`` and ``1024``, and RSO's (its partitioned ``P``, ``in x r`` per linear, gathered by
FSDP2 for forward and backward). Embeddings and the LM head are left out of FSDP2's traffic;
counting them would only lower the share.

    python benchmarks/distributed.py                               # 1, 2 and 3 CPU ranks, 60M shapes
    python benchmarks/distributed.py --state-layout replicated     # the layout without basis traffic
    python benchmarks/distributed.py --shapes 1b --layers 1 --rank 512 --gap 200

With ``--replicate-traffic`` it measures instead the replicate (inter-node) gradient traffic of the
projected sync against DDP's or HSDP's full all-reduce; the options are those of
``benchmarks/replica_traffic.py``:

    python benchmarks/distributed.py --replicate-traffic --shapes 7b --rank 256 [--hsdp 2]
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
from distopt.core.projector import SIDES, resolve_side  # noqa: E402
from distopt.models import LlamaShape, TinyLlama  # noqa: E402

# FSDP2's bytes per parameter element per step: gathered weights (forward, backward) + reduced gradient.
FSDP_BYTES = {"fp32": 4 + 4 + 4, "bf16-mixed": 2 + 2 + 4, "bf16": 2 + 2 + 2}
FORMULA_SHAPES = {"1b": (2048, 5461), "7b": (4096, 11008)}  # hidden, intermediate
SHAPES = {**SHAPES, "7b": LlamaShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32)}


def decoder_matrices(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """``(m, n)`` of one LLaMA decoder layer's linears (out x in)."""
    return [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]


def partition_traffic_share(hidden: int, intermediate: int, rank: int, precision: str, side: str = "auto") -> float:
    """Ring bytes per rank that partitioning adds per step (each right basis all-gathered, ``n r``
    fp32) over FSDP2's for the same matrices; the ``(N-1)/N`` factor is common to both and cancels."""
    added = fsdp = 0
    for m, n in decoder_matrices(hidden, intermediate):
        if resolve_side(side, (m, n)) == "right" and rank < n:
            added += 4 * n * rank
        fsdp += FSDP_BYTES[precision] * m * n
    return added / fsdp


# Bytes of one element of a gathered weight (compute dtype) and of a reduced gradient.
GATHER_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16": 2}
REDUCE_BYTES = {"fp32": 4, "bf16-mixed": 4, "bf16": 2}


def rso_traffic_share(hidden: int, intermediate: int, rank: int, precision: str) -> float:
    """Ring bytes per rank that RSO's partitioned ``P`` adds per step: FSDP2 gathers each ``in x r``
    ``P`` for forward and again for backward, in the compute dtype. Against FSDP2's traffic for the
    same reparametrized layer: frozen ``W`` and ``B^T`` (``out x r``) gathered twice, ``B``'s
    gradient reduced (``W`` has none). A merge's all-gather of ``P`` (once per ``tau`` steps) is
    left out."""
    added = fsdp = 0
    c, g = GATHER_BYTES[precision], REDUCE_BYTES[precision]
    for out, inp in decoder_matrices(hidden, intermediate):
        r = min(rank, inp)
        added += 2 * c * inp * r
        fsdp += 2 * c * (out * inp + out * r) + g * out * r
    return added / fsdp


def ring_bytes(traffic: dict[str, int], world_size: int) -> float:
    """Bytes each rank sends in ring algorithms, from ``comm``'s per-kind payload counts (the input
    tensor of each call: the whole buffer for reductions, this rank's piece for all-gathers)."""
    if world_size == 1:
        return 0.0
    share = (world_size - 1) / world_size
    factor = {"all_reduce": 2 * share, "reduce_scatter": share, "all_gather": world_size - 1,
              "broadcast": share, "gather": share}
    return sum(factor.get(kind, 1.0) * b for kind, b in traffic.items())


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
    hparams = dict(rank=args.rank, update_proj_gap=args.gap, state_layout=args.state_layout)
    if "side" in args.optimizer_params:
        hparams["side"] = args.side
    if "refresh" in args.optimizer_params:
        hparams["refresh"] = args.refresh
    if args.basis_dtype != "fp32":
        hparams["basis_dtype"] = args.basis_dtype
    opt = distopt.build_optimizer(model, args.optimizer, **hparams)
    opt.allocate_state()
    matrices = [p for g in opt.param_groups if g["kind"] == "matrix" for p in g["params"]]
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    replicated = 0
    for p in matrices:
        split = opt._distributed_keys(p, group) if opt._views[p].parts > 1 else None
        for key, t in opt.state[p].items():
            if split is not None and key not in split:
                replicated += t.numel() * t.element_size()
    matrix_param_elements = sum(opt._views[p].m * opt._views[p].n for p in matrices)

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
    full = distopt.build_optimizer(model, args.optimizer, **{**hparams, "update_proj_gap": 2, "stagger": False})
    for _ in range(2):  # the first bases, then a plain step: timing starts on a warm-started refresh
        full.step()
    refresh_times = []
    for _ in range(args.refresh_repeats):
        times = []
        for _ in range(2):  # a refresh step, then a plain one
            dist.barrier()
            with comm.counting() as counted:
                start = time.perf_counter()
                full.step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        refresh_times.append(times[0] - times[1])
        plain_calls = counted()["calls"]  # the plain step's collectives, by kind
    refresh_s = min(refresh_times)
    row = {
        "world_size": world_size, "rank": rank, "state_bytes": distopt.state_bytes(opt), "replicated_bytes": replicated,
        "distopt_bytes_per_step": ring_bytes(traffic, world_size) / args.gap, "traffic_by_kind": traffic,
        "fsdp_bytes_per_step": FSDP_BYTES[args.precision] * matrix_param_elements * (world_size - 1) / world_size,
        "cycle_s": cycle_s, "full_refresh_s": refresh_s,
        "collectives_per_plain_step": sum(plain_calls.values()), "collectives_by_kind": plain_calls,
    }
    torch.save(row, os.path.join(out, f"r{world_size}_{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--replicate-traffic" in argv:
        import replica_traffic

        return replica_traffic.main([arg for arg in argv if arg != "--replicate-traffic"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--world-sizes", default="1,2,3")
    parser.add_argument("--optimizer", default="galore", choices=distopt.list_optimizers())
    parser.add_argument("--shapes", default="60m", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (traffic and memory scale per layer)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--side", default="auto", choices=SIDES)
    parser.add_argument("--refresh", default="randomized", choices=["randomized", "svd", "random"])
    parser.add_argument("--refresh-repeats", type=int, default=2, help="full refresh cycles timed (the fastest is kept)")
    parser.add_argument("--state-layout", default="partitioned", choices=["partitioned", "replicated"])
    parser.add_argument("--basis-dtype", default="fp32", choices=["fp32", "bf16"], help="galore, golore: storage of the bases")
    parser.add_argument("--precision", default="bf16-mixed", choices=sorted(FSDP_BYTES),
                        help="byte sizes of FSDP2's traffic compared against (default: bf16 compute, fp32 reduce)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per rank (0: the cores divided by the ranks). 1 gives every world size one core "
                             "per rank, so the refresh speed-up measures parallelism rather than a shared core count")
    parser.add_argument("--out", default="runs/bench/distributed.json")
    args = parser.parse_args(argv)
    if args.refresh_repeats < 1:
        parser.error(f"--refresh-repeats {args.refresh_repeats}: time at least one refresh cycle (e.g. 2)")
    import inspect

    from distopt.optim import REGISTRY

    args.optimizer_params = sorted(inspect.signature(REGISTRY[args.optimizer].__init__).parameters)
    if "rank" not in args.optimizer_params or "state_layout" not in args.optimizer_params:
        parser.error(f"--optimizer {args.optimizer}: takes no subspace rank or state layout")
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
        row["traffic_share"] = row["distopt_bytes_per_step"] / row["fsdp_bytes_per_step"] if row["world_size"] > 1 else 0.0
        if single:
            row["state_vs_ideal"] = row["state_bytes"] / (single["state_bytes"] / row["world_size"])
            row["refresh_speedup"] = single["full_refresh_s"] / row["full_refresh_s"]
    formula = [
        {"shapes": key, "rank": r, "precision": args.precision,
         "added_share": partition_traffic_share(*FORMULA_SHAPES[key], r, args.precision, args.side),
         "rso_added_share": rso_traffic_share(*FORMULA_SHAPES[key], r, args.precision)}
        for key in FORMULA_SHAPES for r in (256, 1024)
    ]
    payload = {"benchmark": "distributed", "env": environment(args.device),
               "settings": {k: v for k, v in vars(args).items() if k != "optimizer_params"},
               "results": rows, "partition_traffic_formula": formula}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [
        ("world_size", "ranks", "d"), ("rank", "rank", "d"), ("state_bytes", "state B (all)", ",d"),
        ("state_vs_ideal", "x ideal (1-rank/N)", ".3f"), ("replicated_bytes", "replicated B", ",d"),
        ("distopt_bytes_per_step", "distopt B/step", ",.0f"), ("traffic_share", "share of FSDP2 traffic", ".3%"),
        ("full_refresh_s", "full refresh s", ".3f"), ("refresh_speedup", "refresh speed-up", ".2f"),
        ("collectives_per_plain_step", "collectives / plain step", "d"),
    ]))
    print("\nTraffic the partitioned layout adds over the replicated one, by formula (one decoder layer):")
    print(markdown_table(formula, [("shapes", "shapes", "s"), ("rank", "r", "d"), ("precision", "FSDP2 bytes", "s"),
                                   ("added_share", "added / FSDP2's", ".2%"),
                                   ("rso_added_share", "rso: P gathers / FSDP2's", ".2%")]))
    print(f"\n{args.optimizer} | shapes {args.shapes} x {args.layers} layer(s) | rank {args.rank} | gap {args.gap} | "
          f"side {args.side} | refresh {args.refresh} | state_layout {args.state_layout} | basis {args.basis_dtype} | JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
