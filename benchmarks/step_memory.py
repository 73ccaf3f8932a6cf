"""Peak temporaries of one plain optimizer step at the structure of LLaMA-7B, against ``coalesce_bytes``.

The projected family steps matrices by batches (one process) and buckets of coalesced collectives
(FSDP2), each meant to hold at most ``coalesce_bytes`` of temporaries (a sharded step also one run
of stacked gradients or updates of at most as much: under twice it in all). This measures what a
step holds: the model is :mod:`op_count`'s (LLaMA-7B's 224 matrices and shape classes at widths
divided by ``--shrink``, ``coalesce_bytes`` divided by ``shrink**2``, so every batch and bucket
holds the matrices it would at full width), the step runs as a GPU runs it (each op allocates its
result; no CPU buffers kept between steps), and the peak is the most bytes of tensors it allocated
and held at once, read after each aten op (what ``torch.cuda.max_memory_allocated`` shows above its
start, without the caching allocator's rounding). Ranks are gloo processes.

    python benchmarks/step_memory.py                                  # galore, grassjump; 1, 2 and 4 ranks
    python benchmarks/step_memory.py --optimizers galore,galore-packed --world-sizes 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]  # tests/distributed: the rank spawner

from common import as_on_a_gpu, environment, markdown_table, peak_tensor_bytes, write_json  # noqa: E402
from op_count import ready_for_a_plain_step, structure_arguments  # noqa: E402


def peaks(rank_index: int, world_size: int, names: list[str], shrink: int, rank: int, coalesce_bytes: int) -> dict:
    with as_on_a_gpu():
        out = {}
        for choice in names:
            optimizer = ready_for_a_plain_step(choice, world_size, shrink, rank, coalesce_bytes)
            out[choice] = peak_tensor_bytes(optimizer.step)
        return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    structure_arguments(parser, "galore,grassjump", "1,2,4", "runs/bench/step_memory.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    limit = max(1, (args.coalesce_mib << 20) // args.shrink**2)  # what each optimizer is given
    rows = []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        if world_size == 1:
            per_rank = [peaks(0, 1, names, args.shrink, args.rank, args.coalesce_mib << 20)]
        else:
            from distributed.harness import run_ranks

            per_rank = run_ranks(world_size, peaks, names, args.shrink, args.rank, args.coalesce_mib << 20)
        for name in names:
            top = max(rank_peaks[name] for rank_peaks in per_rank)
            rows.append({"optimizer": name, "world_size": world_size, "peak_bytes": top,
                         "peak_x_coalesce_bytes": top / limit, "full_width_mib": top * args.shrink**2 / 2**20})
    payload = {"benchmark": "step_memory", "env": environment("cpu"),
               "settings": {"structure": "llama-7b", "shrink": args.shrink, "rank": args.rank, "matrices": 224,
                            "coalesce_mib": args.coalesce_mib, "measured": "peak tensor bytes a plain step allocated "
                            "and held, the largest over ranks, each op allocating its result as on a GPU"},
               "results": rows}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [("optimizer", "optimizer", "s"), ("world_size", "ranks", "d"),
                                ("peak_x_coalesce_bytes", "peak / coalesce_bytes", ".2f"),
                                ("full_width_mib", "at full width (MiB)", ".0f")]))
    print(f"\nLLaMA-7B structure (224 matrices), widths / {args.shrink}, rank {args.rank} at full width, "
          f"coalesce_bytes {args.coalesce_mib} MiB | JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
