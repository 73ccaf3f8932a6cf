"""Aten ops one plain optimizer step dispatches, at the structure of LLaMA-7B, per optimizer.

A step bound by launches costs about its op count times a launch, so the count, not the flops, is
what batching has to bring down: O(batches of one shape), not O(matrices). Counted with a
``TorchDispatchMode`` (a ``torch._foreach_*`` call over a list is one op; a collective is one op).

The model has LLaMA-7B's structure (32 layers, 224 matrices, the 7B's shape classes) at widths
divided by ``--shrink`` (16: hidden 256, MLP 688, vocab 2000), with ``coalesce_bytes`` divided by
``shrink**2``: every batch, chunk and bucket the step forms holds the same matrices as at full
width, so the count is the 7B step's. Ranks are gloo processes (FSDP2, ``--world-sizes``); 1 is one
process.

    python benchmarks/op_count.py                       # galore, AdamW; 1 and 2 ranks
    python benchmarks/op_count.py --optimizers galore,subtrack,adam-mini --world-sizes 1
    python benchmarks/op_count.py --optimizers galore --world-sizes 1,2,4,8 --coalesce-mib 1536
    python benchmarks/op_count.py --optimizers galore,galore-packed --world-sizes 1   # weights packed first

The count is what a GPU's step dispatches: on a CPU, batches also check their own gradients (a sum
and a host read each) and write their temporaries into buffers kept between steps; both are off
here. The element-wise group's AdamW and the finiteness check still take their CPU forms (a
constant handful of ops either way).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]  # tests/distributed: the rank spawner

from common import OpCounter, as_on_a_gpu, environment, markdown_table, packed_as_asked, write_json  # noqa: E402

import distopt  # noqa: E402
from distopt.models import LlamaShape, TinyLlama  # noqa: E402
from distopt.optim import REGISTRY  # noqa: E402
from distopt.optim.projected import ProjectedAdam  # noqa: E402

FULL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)


def shape(shrink: int) -> LlamaShape:
    return LlamaShape(vocab_size=FULL["vocab_size"] // shrink, hidden_size=FULL["hidden_size"] // shrink,
                      intermediate_size=FULL["intermediate_size"] // shrink, num_hidden_layers=FULL["num_hidden_layers"],
                      num_attention_heads=max(1, 32 // shrink))


def build(name: str, model: torch.nn.Module, rank: int):
    if name == "adamw-fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    accepted = inspect.signature(REGISTRY[name].__init__).parameters
    wanted = dict(rank=rank, update_proj_gap=10**9, tau=10**9)  # no refresh after the first step
    return distopt.build_optimizer(model, name, lr=1e-3, **{k: v for k, v in wanted.items() if k in accepted})


def count(rank_index: int, world_size: int, names: list[str], shrink: int, rank: int,
          coalesce_bytes: int = ProjectedAdam.coalesce_bytes) -> dict:
    with as_on_a_gpu():
        return {choice: _count(choice, world_size, shrink, rank, coalesce_bytes) for choice in names}


def _count(choice: str, world_size: int, shrink: int, rank: int, coalesce_bytes: int) -> int:
    optimizer = ready_for_a_plain_step(choice, world_size, shrink, rank, coalesce_bytes)
    with OpCounter() as ops:
        optimizer.step()
    return ops.count


def ready_for_a_plain_step(choice: str, world_size: int, shrink: int, rank: int, coalesce_bytes: int):
    """The optimizer ``choice`` on the 7B-structured model (FSDP2 over ``world_size`` ranks, where
    more than 1), with gradients set and its first two steps taken (the first bases, then a plain
    step that packs its state): its next step is a plain one."""
    torch.manual_seed(0)
    model = TinyLlama(shape(shrink))
    name = packed_as_asked(choice, model)
    if name == "rso" and world_size > 1:  # its factors must exist before fully_shard
        from distopt.optim.rso import reparametrize

        reparametrize(model, rank=rank // shrink)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = build(name, model, rank // shrink)
    if isinstance(optimizer, ProjectedAdam) or hasattr(optimizer, "coalesce_bytes"):
        optimizer.coalesce_bytes = max(1, coalesce_bytes // shrink**2)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        if world_size > 1 and hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(p.grad, p.device_mesh, p.placements)
    for _ in range(2):  # the first bases, then a plain step
        optimizer.step()
    return optimizer


def structure_arguments(parser: argparse.ArgumentParser, optimizers: str, world_sizes: str, out: str) -> None:
    """The options of a run on the 7B-structured model: which optimizers and world sizes, its shrink,
    the subspace rank and ``coalesce_bytes`` at full width, and the JSON's path."""
    parser.add_argument("--optimizers", default=optimizers)
    parser.add_argument("--world-sizes", default=world_sizes)
    parser.add_argument("--shrink", type=int, default=16)
    parser.add_argument("--rank", type=int, default=1024, help="the subspace rank at full width")
    parser.add_argument("--coalesce-mib", type=int, default=ProjectedAdam.coalesce_bytes >> 20,
                        help="the optimizers' coalesce_bytes at full width, in MiB (default: theirs)")
    parser.add_argument("--out", default=out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    structure_arguments(parser, "adamw-fused,adamw-foreach,galore", "1,2", "runs/bench/op_count.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    rows = []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        if world_size == 1:
            counts = count(0, 1, names, args.shrink, args.rank, args.coalesce_mib << 20)
        else:
            from distributed.harness import run_ranks

            counts = run_ranks(world_size, count, names, args.shrink, args.rank, args.coalesce_mib << 20)[0]
        rows += [{"optimizer": name, "world_size": world_size, "aten_ops_per_plain_step": n} for name, n in counts.items()]
    payload = {"benchmark": "op_count", "env": environment("cpu"),
               "settings": {"structure": "llama-7b", "shrink": args.shrink, "rank": args.rank, "matrices": 224,
                            "coalesce_mib": args.coalesce_mib},
               "results": rows}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [("optimizer", "optimizer", "s"), ("world_size", "ranks", "d"),
                                ("aten_ops_per_plain_step", "aten ops per plain step", "d")]))
    print(f"\nLLaMA-7B structure (224 matrices), widths / {args.shrink}, rank {args.rank} at full width, "
          f"coalesce_bytes {args.coalesce_mib} MiB | JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
