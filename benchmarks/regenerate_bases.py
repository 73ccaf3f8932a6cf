"""Storing a seeded random basis against drawing it again each step.

GoLore's random bases, GrassJump's Haar jumps and RSO's ``P`` are functions of a seed, so a rank
could regenerate them when needed instead of keeping them. This measures what that would cost at
LLaMA shapes: the time to draw each decoder matrix's basis (``seeded_gaussian``: on a CPU, torch's
CPU generator, the same numbers on every rank; ``haar_basis``: the same plus a QR), summed over
one decoder layer and extrapolated to the model's layers, next to the bytes a rank keeps instead
under the partitioned layout (``n r / N`` fp32 per basis).

    python benchmarks/regenerate_bases.py                      # 7B shapes, r = 256 and 1024
    python benchmarks/regenerate_bases.py --shapes 1b --ranks 256 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, markdown_table, write_json  # noqa: E402

from distopt.core.linalg import haar_basis, seeded_gaussian  # noqa: E402

SHAPES = {"1b": (2048, 5461, 24), "7b": (4096, 11008, 32)}  # hidden, intermediate, layers


def _fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def basis_sides(hidden: int, intermediate: int) -> dict[str, list[int]]:
    """Length ``n`` of each decoder matrix's basis (q, k, v, o, gate, up, down): the shorter side for
    GaLore-family bases, the input side for RSO's ``P``."""
    return {"subspace basis (shorter side)": [hidden] * 7, "rso P (input side)": [hidden] * 6 + [intermediate]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--ranks", default="256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default="runs/bench/regenerate_bases.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, intermediate, layers = SHAPES[args.shapes]
    rows = []
    cache: dict[tuple[int, int], tuple[float, float]] = {}
    for kind, sides in basis_sides(hidden, intermediate).items():
        for r in [int(x) for x in args.ranks.split(",")]:
            print(f"{kind}, rank {r}: timing one layer's bases...", file=sys.stderr)
            for n in set(sides):
                if (n, r) not in cache:
                    cache[n, r] = (_fastest(lambda n=n, r=r: seeded_gaussian((n, r), 1234), args.repeats),
                                   _fastest(lambda n=n, r=r: haar_basis(n, r, 1234, "cpu"), args.repeats))
            stored = sum(4 * n * r for n in sides) * layers
            rows.append({"shapes": args.shapes, "kind": kind, "rank": r, "layers": layers,
                         "gaussian_s_per_model": sum(cache[n, r][0] for n in sides) * layers,
                         "haar_s_per_model": sum(cache[n, r][1] for n in sides) * layers,
                         "stored_gib_1_rank": stored / 2**30, "stored_gib_8_ranks": stored / 8 / 2**30,
                         "stored_gib_64_ranks": stored / 64 / 2**30})
    payload = {"benchmark": "regenerate_bases", "env": environment("cpu"), "settings": vars(args), "results": rows}
    path = write_json(args.out, payload)
    print(markdown_table(rows, [
        ("shapes", "shapes", "s"), ("kind", "basis", "s"), ("rank", "r", "d"), ("gaussian_s_per_model", "draw all (Gaussian) s", ".2f"),
        ("haar_s_per_model", "draw all (Haar, + QR) s", ".2f"), ("stored_gib_1_rank", "kept, 1 rank GiB", ".2f"),
        ("stored_gib_8_ranks", "kept, 8 ranks GiB/rank", ".3f"), ("stored_gib_64_ranks", "kept, 64 ranks GiB/rank", ".4f"),
    ]))
    print(f"\nOne basis per decoder matrix, {layers} layers; JSON: {path}")
    return payload


if __name__ == "__main__":
    main()
