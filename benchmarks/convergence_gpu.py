"""The convergence study's learning-rate sweep on one GPU, at LLaMA-60M shape.

The CPU study (``benchmarks/convergence.py``) trains a 3.3M byte-level LLaMA for 600 steps. This
runs its flagships and their lr grids on the 60M shape of the GaLore paper
(``configs/models/llama_60m.yaml``, byte tokens, so the embedding is 256 rows) for a few thousand
steps, with the same data (Python's standard library of the running interpreter), schedule shape
and library defaults, rank 128 (a quarter of the 512-wide short side) and bf16 autocast.

Small runs leave most of a large GPU idle, so ``--parallel`` runs go side by side, one process
each. The queue is ordered so that a cut-off run still answers the most: every optimizer at the lr
the CPU study chose first, then its grid neighbours, nearest first; once runs have finished in
``--out``, only the lrs that still bracket each optimizer's best (going past the grid where the best
lies at an end), so a folder of earlier results resumes the sweep. Each finished run is written
at once as ``<out>/<key>.json`` (the CPU study's record format); a run still going at
``--deadline`` is stopped, and its validation curve so far goes to ``<out>/partial/``.

    python benchmarks/convergence_gpu.py --plan --out docs/results/convergence_gpu60m  # what is left
    python benchmarks/convergence_gpu.py --deadline 500 --out runs/convergence_gpu
    python benchmarks/convergence_gpu.py --report docs/results/convergence_gpu60m   # table of a folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import convergence  # noqa: E402

RANK = 128  # a quarter of the 60M model's 512-wide short side


def settings(steps: int, batch: int, device: str) -> list[str]:
    return ["model.name=60m", f"train.steps={steps}", f"train.batch_size={batch}", "data.seq_len=256",
            f"schedule.warmup_steps={max(1, steps // 10)}", f"eval.every={max(1, steps // 8)}", "eval.batches=8",
            f"log.every={max(1, steps // 40)}", f"engine.device={device}", "engine.threads=2",
            f"train.precision={'bf16-mixed' if device == 'cuda' else 'fp32'}"]


def cpu_choice(optimizer: str) -> float:
    """The lr the CPU study chose (its cached seed-0 runs), else the middle of the grid."""
    best = convergence.Study([], dry=True)._best_cached(optimizer)
    return best if best is not None else convergence.GRIDS[optimizer][len(convergence.GRIDS[optimizer]) // 2]


def finished_losses(out: Path | None) -> dict[tuple[str, float], float]:
    """Final validation loss of every finished seed-0 run in ``out``, by (optimizer, lr)."""
    if out is None or not out.is_dir():
        return {}
    runs = (json.loads(p.read_text()) for p in out.glob("*.json"))
    return {(r["optimizer"], r["lr"]): convergence.loss(r) for r in runs if r.get("seed", 0) == 0}


def queue(optimizers: list[str], out: Path | None = None) -> list[tuple[str, float]]:
    """The runs still needed, round by round over the optimizers.

    Before any result: each optimizer's CPU choice, then its grid, nearest first. Once runs have
    finished (in ``out``): only what brackets the best lr so far, the nearest untried value on
    each side of it (beyond the grid where the best is at an end), where no finished run already
    bounds that side. A value past a finished worse one is skipped."""
    finished = finished_losses(out)
    per = {}
    for name in optimizers:
        done = {lr: loss for (o, lr), loss in finished.items() if o == name}
        finite = {lr: loss for lr, loss in done.items() if math.isfinite(loss)}
        if not finite:
            center = cpu_choice(name)
            grid = sorted(set(convergence.GRIDS[name]) | {center})
            per[name] = [lr for lr in sorted(grid, key=lambda lr: (abs(math.log(lr / center)), lr)) if lr not in done]
            continue
        best = min(finite, key=finite.get)
        sides = []
        for up in (False, True):
            if any((lr > best) if up else (lr < best) for lr in done):
                continue  # a finished run bounds this side
            sides.append(convergence._neighbour(best, up))
        per[name] = sides
    rounds = max((len(v) for v in per.values()), default=0)
    return [(name, per[name][i]) for i in range(rounds) for name in optimizers if i < len(per[name])]


def spec(optimizer: str, lr: float) -> str:
    extra = {"rank": RANK} if convergence.hparams(optimizer) else {}
    return optimizer + ":" + ",".join(f"{k}={v}" for k, v in {"lr": lr, **extra}.items())


def record(out_dir: Path, optimizer: str, lr: float, code: int, wall: float, steps: int) -> dict:
    path = out_dir / "compare.json"
    entry = json.loads(path.read_text())[0] if path.is_file() else None  # none where the run died early
    return {"corpus": "stdlib", "optimizer": optimizer, "lr": lr, "seed": 0,
            "hparams": {"rank": RANK} if convergence.hparams(optimizer) else {}, "exit": code, "wall_s": round(wall, 1),
            "setting": f"llama-60m byte tokens, {steps} steps", **convergence.run_results(entry)}


def run(args) -> int:
    from distopt.job.metrics import read_jsonl

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    todo = queue(args.optimizers.split(","), out)
    started, running, done = time.monotonic(), {}, 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    while todo or running:
        while todo and len(running) < args.parallel:
            optimizer, lr = todo.pop(0)
            key = convergence.run_key("stdlib", optimizer, lr, 0)
            run_dir = out / "runs" / key
            cmd = [sys.executable, "-m", "distopt.job.compare", "--config", convergence.CONFIG, "--optimizers",
                   spec(optimizer, lr), "--out_dir", str(run_dir), *settings(args.steps, args.batch, args.device)]
            log = open(out / "runs" / f"{key}.log", "w")
            running[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                            optimizer, lr, time.monotonic(), run_dir)
            print(f"[{time.monotonic() - started:6.0f}s] start {key}", flush=True)
        time.sleep(1)
        for key, (proc, optimizer, lr, t0, run_dir) in list(running.items()):
            if proc.poll() is None:
                continue
            rec = record(run_dir, optimizer, lr, proc.returncode, time.monotonic() - t0, args.steps)
            (out / f"{key}.json").write_text(json.dumps(rec))
            for folder in run_dir.glob("*/checkpoints"):  # the final save: 0.7 GB a run, not needed here
                shutil.rmtree(folder, ignore_errors=True)
            del running[key]
            done += 1
            print(f"[{time.monotonic() - started:6.0f}s] done  {key}: val {rec['final_val_loss']:.4f} "
                  f"({rec['wall_s']:.0f} s)", flush=True)
        if args.deadline and time.monotonic() - started > args.deadline:
            for proc, *_rest in running.values():
                proc.terminate()
            (out / "partial").mkdir(exist_ok=True)
            for key, (proc, optimizer, lr, t0, run_dir) in running.items():
                proc.wait(timeout=30)
                curve = [[r["step"], r["val_loss"]] for path in run_dir.glob("*/metrics.jsonl")
                         for r in read_jsonl(path) if r.get("kind") == "eval"]
                (out / "partial" / f"{key}.json").write_text(json.dumps(
                    {"optimizer": optimizer, "lr": lr, "stopped_after_s": round(time.monotonic() - t0), "val_curve": curve}))
                print(f"stopped at the deadline: {key} (val curve so far in partial/: {curve[-1:] or 'none'})", flush=True)
            print(f"not started: {', '.join(convergence.run_key('stdlib', o, lr, 0) for o, lr in todo) or 'none'}")
            break
    print(f"{done} runs finished in {time.monotonic() - started:.0f} s")
    print(report_folder(out))
    return 0


def report_folder(folder: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return convergence.report(runs) if runs else "no finished runs\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default=",".join(convergence.FLAGSHIPS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="sequences of 256 byte tokens per step")
    p.add_argument("--parallel", type=int, default=8, help="runs side by side on the one GPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=0, help="seconds; stop what is still running then (0: none)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "convergence_gpu"))
    p.add_argument("--plan", action="store_true", help="print the queue and exit")
    p.add_argument("--report", metavar="FOLDER", help="print the table of a folder of finished runs and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report_folder(Path(args.report)))
        return 0
    if args.plan:
        for optimizer, lr in queue(args.optimizers.split(","), Path(args.out)):
            print(convergence.run_key("stdlib", optimizer, lr, 0), spec(optimizer, lr))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
