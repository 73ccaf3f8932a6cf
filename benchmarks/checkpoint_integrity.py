"""What checkpoint integrity costs: save with and without digests (a ``torch.save`` file: the CRC
of its zip index; DCP shards: block digests computed as they are written), and load with and
without verifying every byte (on a helper thread while the file loads, as the training job does),
on a synthetic state of ``--gib`` GiB.

    python benchmarks/checkpoint_integrity.py --gib 1 --repeats 3

Prints a table and writes JSON (``--out``). Each time is the fastest of ``--repeats`` runs (the
overhead between medians is printed too, as a measure of the machine's noise); the
files go to ``--dir`` (default: a temporary folder on the same disk as the repository).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import environment, markdown_table, write_json

from distopt import checkpoint as integrity


def plain_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def interleaved(plain, checked, repeats: int) -> tuple[list[float], list[float]]:
    """Times of ``repeats`` runs of each, alternating them."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((plain, times[0]), (checked, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of the synthetic state")
    p.add_argument("--tensors", type=int, default=16, help="how many tensors it is split into")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary folder under the repository)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "runs" / "bench" / "checkpoint_integrity.json"))
    args = p.parse_args(argv)
    numel = int(args.gib * 2**30 / 4 / args.tensors)
    state = {f"t{i}": torch.randn(numel) for i in range(args.tensors)}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir=args.dir or root) as folder:
        path = Path(folder) / "state.pt"
        shards = Path(folder) / "dcp"

        def dcp_save(hashed: bool):
            shutil.rmtree(shards, ignore_errors=True)
            if hashed:  # as distopt.checkpoint.save: every file hashed as it is written
                writer = integrity.hashing_writer(shards)
                dcp.save(state, storage_writer=writer)
                manifests["dcp"] = dict(writer.fs.digests)
            else:
                dcp.save(state, checkpoint_id=str(shards))

        def dcp_load(verified: bool):
            target = {k: torch.empty_like(v) for k, v in state.items()}
            if not verified:
                dcp.load(target, checkpoint_id=str(shards))
                return
            # As distopt.checkpoint.load: the files are hashed on a helper thread while DCP reads them.
            with ThreadPoolExecutor(1) as pool:
                checking = pool.submit(integrity.local_problems, shards, manifests["dcp"])
                dcp.load(target, checkpoint_id=str(shards))
                integrity.raise_if_any(checking.result())

        def verified_load():  # as the training job resumes: verify on a helper thread while loading
            with ThreadPoolExecutor(1) as pool:
                checking = pool.submit(integrity.verify_files, Path(folder), {"state.pt": manifests["pt"]})
                torch.load(path, weights_only=True)
                checking.result()

        manifests = {"pt": None}

        def hashed_save():
            manifests["pt"] = integrity.save_file(state, path)

        timings = {  # plain and checked alternate, so drift in the machine's load hits both
            "save": interleaved(lambda: plain_save(state, path), hashed_save, args.repeats),
            "load": interleaved(lambda: torch.load(path, weights_only=True), verified_load, args.repeats),
            "dcp save": interleaved(lambda: dcp_save(False), lambda: dcp_save(True), args.repeats),
            "dcp load": interleaved(lambda: dcp_load(False), lambda: dcp_load(True), args.repeats),
        }
        size = path.stat().st_size
    kind = integrity.block_kind()[len("block_"):].upper()
    labels = {"save": "torch.save + fsync (CRC of the zip index)", "load": "torch.load (every record verified beside it)",
              "dcp save": f"DCP save (shards hashed as written, {kind})", "dcp load": f"DCP load (shards verified beside it, {kind})"}
    rows = [{"operation": labels[k], "plain_s": min(a), "with_integrity_s": min(b), "overhead": min(b) / min(a) - 1,
             "median_overhead": statistics.median(b) / statistics.median(a) - 1, "plain_times_s": a, "with_integrity_times_s": b}
            for k, (a, b) in timings.items()]
    table = markdown_table(rows, [("operation", "operation", "s"), ("plain_s", "plain s", ".3f"),
                                  ("with_integrity_s", "with digests s", ".3f"), ("overhead", "overhead", "+.1%"),
                                  ("median_overhead", "median overhead", "+.1%")])
    print(f"{size / 2**30:.2f} GiB file, fastest of {args.repeats}, {torch.get_num_threads()} torch threads\n")
    print(table)
    write_json(args.out, {"benchmark": "checkpoint_integrity", "env": environment("cpu"), "bytes": size,
                          "repeats": args.repeats, "rows": rows})
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
