"""benchmarks/gpu_suite.py: the whole suite runs on CPU with tiny shapes and writes every section;
its max-batch search, out-of-memory handling and missing comparison packages behave as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

_saved_path = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_suite  # noqa: E402
from suite import base  # noqa: E402

# benchmarks/ holds distributed.py and deepspeed.py: left on the path they would shadow the
# tests' `distributed` package and DeepSpeed in every later test (and in the ranks they spawn).
sys.path[:] = _saved_path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
OURS = ("galore", "adapm-mini", "grassjump", "subtrack")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), out, done.stdout


def _rows(payload, section, key="optimizer"):
    return {r[key]: r for r in payload["sections"][section]["rows"]}


def test_every_section_is_written(suite):
    payload, out, stdout = suite
    assert set(payload["sections"]) == set(gpu_suite.SECTIONS)
    tables = out.with_suffix(".md").read_text()
    for name in gpu_suite.SECTIONS:
        assert f"## {name}\n" in tables
        assert payload["sections"][name]["markdown"] in tables
    assert "## goals (CPU/tiny: not evidence)" in stdout
    assert payload["env"]["device"] == "cpu"
    assert payload["settings"]["tiny"] is True
    assert payload["goals"] and not any(g["evidence"] for g in payload["goals"])


def test_step_rows_have_timings_and_state(suite):
    rows = _rows(suite[0], "step")
    assert set(rows) == set(gpu_suite.STEP_OPTIMIZERS)
    gap = suite[0]["settings"]["gap"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
        assert row["steps"] == gap
        for key in ("first_ms", "mean_ms", "median_ms", "max_ms"):
            assert row[key] > 0, (name, key)
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["state_bytes"] > 0
        assert row["amortized_x_fused_adamw"] == pytest.approx(row["mean_ms"] / rows["adamw-fused"]["mean_ms"])
    adamw = rows["adamw-fused"]["state_bytes"]
    assert rows["galore"]["state_bytes"] < adamw
    assert all(rows[name]["state_bytes"] < adamw for name in OURS)
    assert rows["adamw-fused"]["source"] == "torch"
    assert rows["galore-torch"]["source"].startswith("galore-torch")
    assert rows["galore"]["source"].startswith("distopt")


def test_training_sections(suite):
    payload = suite[0]
    e2e = _rows(payload, "e2e")
    assert list(e2e) == ["adamw-fused", "galore", "adapm-mini"]
    for name, row in e2e.items():
        assert row["status"] == "ok", (name, row)
        assert (row["batch"], row["seq"]) == (2, 32)
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / (row["mean_ms"] / 1e3))
        assert row["model"] == "hf"
        assert row["peak_bytes"] is None and row["max_rss_bytes"] > 0  # CPU: no device peak
    assert e2e["galore"]["state_bytes"] < e2e["adamw-fused"]["state_bytes"]

    maxbatch = _rows(payload, "maxbatch")
    assert list(maxbatch) == ["adamw-fused", "galore"]
    for row in maxbatch.values():  # no out-of-memory on CPU: the search doubles up to the cap
        assert row["status"] == "ok"
        assert (row["max_batch"], row["capped"]) == (4, True)
        assert [t["batch"] for t in row["tried"]] == [1, 2, 4]
        assert row["batch"] == 4 and row["tokens_per_s"] > 0

    big = payload["sections"]["7b"]["rows"]
    assert [r["optimizer"] for r in big] == ["galore", "adamw-fused", "adamw"]
    ours = big[0]
    assert ours["status"] == "ok" and ours["layerwise"] and ours["checkpointing"] and ours["weights"] == "bf16"
    assert ours["tokens_per_s"] > 0 and (ours["batch"], ours["seq"]) == (1, 64)
    assert all(r["status"] in ("ok", "OOM") for r in big)


def test_memory_section_matches_the_estimator(suite):
    rows = _rows(suite[0], "memory", key="run")
    assert len(rows) == 6
    for run, row in rows.items():
        assert row["status"] == "ok", run
        assert row["estimate_bytes"] > row["estimate_state"] > 0
        # the optimizer-state part of `distopt memory` is exact for every optimizer measured here
        assert row["measured_state_bytes"] == row["estimate_state"] + row["estimate_projectors"], run
    assert rows["galore"]["estimate_projectors"] > 0
    assert rows["galore"]["estimate_bytes"] < rows["adamw-fused"]["estimate_bytes"]


def test_largest_batch_doubles_then_bisects():
    seen = []

    def fits(size):
        seen.append(size)
        return size <= 11

    result = base.largest_batch(fits)
    assert result["max_batch"] == 11 and not result["capped"]
    assert seen == [1, 2, 4, 8, 16, 12, 10, 11]
    assert base.largest_batch(lambda b: b <= 100, cap=20) == {
        "max_batch": 20, "capped": True,
        "tried": [{"batch": b, "fits": True} for b in (1, 2, 4, 8, 16, 20)]}
    assert base.largest_batch(lambda b: False)["max_batch"] == 0


def test_out_of_memory_is_reported_not_raised():
    cfg = types.SimpleNamespace(cuda=False)
    progress = {"phase": "optimizer step"}

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity")

    result, failure = base.attempt(oom, cfg, progress)
    assert result is None
    assert failure["status"] == "OOM" and failure["phase"] == "optimizer step"
    assert failure["tried_bytes"] == int(1.5 * 1024**3)
    assert base.tried_bytes("Tried to allocate 20.00 MiB.") == 20 * 1024**2
    assert base.tried_bytes("no size here") is None

    result, failure = base.attempt(lambda: 1 / 0, cfg, progress)
    assert result is None and failure["status"] == "error" and "ZeroDivisionError" in failure["message"]
    assert base.attempt(lambda: 7, cfg, progress) == (7, None)


def test_a_missing_peer_is_skipped_with_the_command_that_installs_it(monkeypatch):
    real = base.importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    notes = []
    versions = base.peer_versions(notes)
    assert versions["galore-torch"] is None
    assert len(notes) == 1 and notes[0].startswith("galore-torch") and "pip install --no-index" in notes[0]
