"""``distopt compare``: the same model, data and budget for each optimizer; one plot, one table."""

from __future__ import annotations

import json

import pytest
from jobutil import job_args

from distopt.job import compare


def test_compare_two_optimizers(tmp_path, capsys):
    args = job_args(tmp_path, **{"train.steps": 4, "eval.every": 2})
    out = tmp_path / "cmp"
    code = compare.main(["--optimizers", "adamw", "galore:rank=4,update_proj_gap=2", "--out_dir", str(out), *args])
    assert code == 0, capsys.readouterr()
    table = (out / "compare.md").read_text()
    assert "| adamw |" in table and "| galore(rank=4, update_proj_gap=2) |" in table
    assert "final val loss" in table and "state bytes / param" in table and "peak memory" in table
    results = {r["label"]: r["summary"] for r in json.loads((out / "compare.json").read_text())}
    assert results["adamw"]["tokens"] == results["galore(rank=4, update_proj_gap=2)"]["tokens"]
    assert results["galore(rank=4, update_proj_gap=2)"]["state_bytes"] < results["adamw"]["state_bytes"]
    assert results["galore(rank=4, update_proj_gap=2)"]["hparams"] == {"rank": 4, "update_proj_gap": 2}
    pytest.importorskip("matplotlib")
    assert (out / "compare.png").stat().st_size > 1000


def test_compare_checks_every_run_before_starting(tmp_path, capsys):
    args = job_args(tmp_path)
    code = compare.main(["--optimizers", "adamw", "galore:rank=-1", "--out_dir", str(tmp_path / "cmp"), *args])
    assert code == 2 and "rank=-1" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
