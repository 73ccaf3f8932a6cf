"""Exact resume: N steps == N/2 steps, checkpoint, resume, N/2 steps (bit for bit, one process)."""

from __future__ import annotations

import json

import pytest
from jobutil import assert_same_tensors, job_args, load_state

from distopt.job import checkpoint as ckpt
from distopt.job import train


def _final(tmp_path, out, step=8):
    ckpt = tmp_path / out / "checkpoints" / f"step_{step:08d}"
    return load_state(ckpt / "model.pt"), load_state(ckpt / "optimizer.pt"), load_state(ckpt / "trainer.pt")


@pytest.mark.parametrize("optimizer", ["galore", "adamw"])
def test_resume_is_bit_identical(tmp_path, optimizer, monkeypatch):
    extra = {"optim.name": optimizer, "train.steps": 8, "train.grad_accum": 2, "model.impl": "hf"}
    if optimizer != "galore":
        extra["optim.hparams"] = "{}"
    assert train.main(job_args(tmp_path, "full", **extra)) == 0
    # Stop at step 4 with a checkpoint (as a preempted job would), then continue in a fresh run.
    assert train.main(job_args(tmp_path, "split", **extra, **{"train.stop_at": 4})) == 0
    split = tmp_path / "split" / "checkpoints"
    assert (split / "latest").read_text().strip() == "step_00000004"
    reads, real_read = {}, ckpt.read_file

    def recording_read(path, mmap=False):
        reads[path.name] = mmap
        return real_read(path, mmap)

    monkeypatch.setattr(ckpt, "read_file", recording_read)
    assert train.main(job_args(tmp_path, "split", **extra) + ["--resume"]) == 0
    monkeypatch.undo()
    assert reads["model.pt"] is True and reads["optimizer.pt"] is True  # mapped, not read into every rank

    model_a, optim_a, trainer_a = _final(tmp_path, "full")
    model_b, optim_b, trainer_b = _final(tmp_path, "split")
    assert_same_tensors(model_a, model_b, "model")
    assert_same_tensors(optim_a["state"], optim_b["state"], "optimizer")
    assert trainer_a["samples_consumed"] == trainer_b["samples_consumed"] == 8 * 2 * 4

    # The metrics of the resumed run continue the first half's without a gap or a repeat.
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    assert train.main(job_args(tmp_path, **{"train.steps": 2, "eval.every": 0})) == 0
    assert train.main(job_args(tmp_path, **{"train.steps": 4, "eval.every": 0})) == 2
    assert "--resume" in capsys.readouterr().err
    # Resuming with another optimizer is refused with the checkpoint's value.
    assert train.main(job_args(tmp_path, **{"train.steps": 4, "optim.name": "adamw", "optim.hparams": "{}"}) + ["--resume"]) == 2
    assert "optim.name='galore'" in capsys.readouterr().err
    assert train.main(job_args(tmp_path, **{"train.steps": 4, "eval.every": 0}) + ["--resume"]) == 0


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    assert train.main(job_args(tmp_path, **{"train.steps": 2, "eval.every": 0}) + ["--resume"]) == 0
    assert "starting fresh" in capsys.readouterr().out


def test_resume_maps_the_replicated_state_files_instead_of_reading_them_into_each_rank(tmp_path):
    # Every rank of a replicated engine loads the whole model and optimizer state: mapped from the
    # file, a node's ranks share the page cache instead of each holding a private copy until the
    # state is copied into the model. Measured as the peak RSS a 256 MiB file adds to one loader.
    import subprocess
    import sys

    import torch

    path = tmp_path / "optimizer.pt"
    torch.save({"state": {f"t{i}": torch.randn(1 << 22) for i in range(16)}}, path)
    probe = (  # VmHWM: the peak RSS of this process image (ru_maxrss would carry the forking parent's)
        "import sys; from pathlib import Path; from distopt.job.checkpoint import read_file\n"
        "def peak(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "before = peak()\n"
        "state = read_file(Path(sys.argv[1]), mmap=sys.argv[2] == '1')\n"
        "assert len(state['state']) == 16\n"
        "print((peak() - before) // 1024)\n"
    )
    from jobutil import REPO, env

    def grown_mib(mmap: bool) -> int:
        out = subprocess.run([sys.executable, "-c", probe, str(path), "1" if mmap else "0"], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert grown_mib(mmap=False) > 200  # the probe sees a private copy
    assert grown_mib(mmap=True) < 50
