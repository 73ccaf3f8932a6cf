"""benchmarks/convergence_gpu.py: the sweep's queue resumes from a folder of finished runs and asks
only for the lrs that still bracket each optimizer's best."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_saved_path = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import convergence_gpu  # noqa: E402

sys.path[:] = _saved_path  # benchmarks/distributed.py would shadow the tests' package


def _finish(folder: Path, optimizer: str, lr: float, val: float) -> None:
    record = {"corpus": "stdlib", "optimizer": optimizer, "lr": lr, "seed": 0, "final_val_loss": val}
    (folder / f"stdlib__{optimizer}__lr{lr}__seed0.json").write_text(json.dumps(record))


def test_best_at_the_low_end_asks_below_the_grid(tmp_path):
    for lr, val in ((3e-4, 0.93), (1e-3, 0.97), (3e-3, 1.7)):
        _finish(tmp_path, "adamw", lr, val)
    assert convergence_gpu.queue(["adamw"], tmp_path) == [("adamw", 1e-4)]


def test_interior_best_needs_nothing_more(tmp_path):
    for lr, val in ((3e-3, 1.0), (1e-2, 0.9), (3e-2, 1.6)):
        _finish(tmp_path, "galore", lr, val)
    assert convergence_gpu.queue(["galore"], tmp_path) == []


def test_one_sided_results_ask_for_the_missing_side_only(tmp_path):
    _finish(tmp_path, "galore", 1e-2, 0.94)
    _finish(tmp_path, "galore", 3e-2, 1.62)  # worse above: 0.1 is not worth a run
    _finish(tmp_path, "snsm", 1e-2, 0.90)
    queue = convergence_gpu.queue(["galore", "snsm"], tmp_path)
    assert queue == [("galore", 3e-3), ("snsm", 3e-3), ("snsm", 3e-2)]


def test_diverged_runs_do_not_count_as_best(tmp_path):
    _finish(tmp_path, "adamw", 1e-2, float("nan"))
    _finish(tmp_path, "adamw", 3e-3, 1.2)
    assert convergence_gpu.queue(["adamw"], tmp_path) == [("adamw", 1e-3)]


def test_without_results_every_grid_value_is_queued_nearest_first(tmp_path):
    queue = convergence_gpu.queue(["galore"], tmp_path)
    center = convergence_gpu.cpu_choice("galore")
    assert queue[0] == ("galore", center)
    assert sorted(lr for _, lr in queue) == sorted(set(convergence_gpu.convergence.GRIDS["galore"]) | {center})
