"""SIGTERM (Slurm preemption) makes the job write a checkpoint after the current step and exit 143."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from jobutil import REPO, env, job_args, python, run


def test_sigterm_writes_a_checkpoint_then_resume_finishes(tmp_path):
    args = job_args(tmp_path, **{"train.steps": 100000, "eval.every": 0, "log.every": 1, "schedule.warmup_steps": 0})
    proc = subprocess.Popen([python(), "launch/train.py", *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and sum(1 for _ in metrics.open()) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            raise AssertionError("the job did not start training in time")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    root = tmp_path / "run" / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    meta = json.loads((latest / "meta.json").read_text())
    step = meta["step"]
    assert step >= 2 and "stopped by signal" in out
    assert not list(root.glob(".*.tmp"))  # no half-written folder left behind

    more = job_args(tmp_path, **{"train.steps": step + 2, "eval.every": 0, "schedule.warmup_steps": 0}) + ["--resume"]
    done = run([python(), "launch/train.py", *more], timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {latest}" in done.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == step + 2


def _sigterm_under(launcher: list[str], tmp_path):
    """SIGTERM to the launcher once the ranks train: its exit code and output."""
    args = job_args(tmp_path, **{"train.steps": 100000, "eval.every": 0, "log.every": 1, "schedule.warmup_steps": 0})
    proc = subprocess.Popen([*launcher, "--standalone", "--nproc_per_node", "1", "launch/train.py", *args], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while not (metrics.is_file() and sum(1 for _ in metrics.open()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def test_distopt_torchrun_exits_143_after_the_ranks_checkpoint_on_sigterm(tmp_path):
    code, out = _sigterm_under([python(), "-m", "distopt.job.torchrun"], tmp_path)
    assert code == 143, out[-3000:]
    assert "stopped by signal" in out and "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    root = tmp_path / "run" / "checkpoints"
    assert json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())["step"] >= 2


def test_distopt_torchrun_gives_the_ranks_time_to_checkpoint_unless_told_otherwise():
    from distopt.job import torchrun

    assert torchrun.shutdown_timeout_env([], {}) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(torchrun.SHUTDOWN_TIMEOUT_S)}
    assert torchrun.SHUTDOWN_TIMEOUT_S > 30  # torchrun's own default
    for argv, environ in ((["--shutdown-timeout", "50"], {}), (["--shutdown_timeout=50"], {}),
                          ([], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "50"}), ([], {"PET_SHUTDOWN_TIMEOUT": "50"})):
        assert torchrun.shutdown_timeout_env(argv, environ) == {}, (argv, environ)
