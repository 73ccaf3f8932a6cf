"""Fault injection on the training job: what the user gets is a clear error or a loud fallback, and
the last good checkpoint is intact. Each case failed (lost data or trained on garbage) before."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from integration.jobutil import REPO, env, job_args, launch_ranks, load_state, ok, python

from distopt import checkpoint as integrity
from distopt.job import checkpoint as ckpt
from distopt.job import train

pytestmark = pytest.mark.slow


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _corrupt(path: Path, seed: int = 0, count: int = 64) -> None:
    """Overwrite ``count`` bytes in the middle of ``path`` with different random bytes."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
    path.write_bytes(bytes(data))


# -- rollback ------------------------------------------------------------------------------------------
def test_rolling_back_keeps_both_branches_and_keep_counts_the_new_one(tmp_path, capsys):
    args = job_args(tmp_path, **{"train.steps": 8, "checkpoint.every": 2, "checkpoint.keep": 3, "eval.every": 0})
    assert train.main(args) == 0
    root = tmp_path / "run" / "checkpoints"
    assert _ckpts(tmp_path / "run") == ["step_00000004", "step_00000006", "step_00000008"]
    abandoned = {name: _meta(root / name)["time"] for name in ("step_00000006", "step_00000008")}

    # Roll back to step 4 and train to 10: the new branch writes 6, 8 and 10.
    again = job_args(tmp_path, **{"train.steps": 10, "checkpoint.every": 2, "checkpoint.keep": 3, "eval.every": 0})
    assert train.main(again + [f"checkpoint.resume={root / 'step_00000004'}"]) == 0
    assert "moved to" in capsys.readouterr().out
    assert _ckpts(tmp_path / "run") == ["step_00000006", "step_00000008", "step_00000010"]
    assert (root / "latest").read_text().strip() == "step_00000010"
    for name, written in abandoned.items():
        assert _meta(root / name)["time"] > written  # the new branch's, not the abandoned ones
    (aside,) = root.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == sorted(abandoned)
    assert {name: _meta(aside / name)["time"] for name in abandoned} == abandoned  # kept as they were

    # A plain --resume continues the new branch.
    assert train.main(job_args(tmp_path, **{"train.steps": 12, "checkpoint.every": 2, "checkpoint.keep": 3,
                                            "eval.every": 0}) + ["--resume"]) == 0
    assert "at step 10" in capsys.readouterr().out


# -- corruption ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["model.pt", "optimizer.pt", "trainer.pt", "rng_rank00000.pt"])
def test_a_corrupted_file_is_named_and_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys, victim):
    base = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0}
    assert train.main(job_args(tmp_path, "ref", **base)) == 0  # uninterrupted
    assert train.main(job_args(tmp_path, **base, **{"train.stop_at": 4})) == 0
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    _corrupt(newest / victim)

    strict = job_args(tmp_path, **base, **{"checkpoint.strict": "true"}) + ["--resume"]
    assert train.main(strict) == 2
    err = capsys.readouterr().err
    assert victim in err and ("corrupted" in err or "cannot be read" in err)

    assert train.main(job_args(tmp_path, **base) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: cannot resume" in out and victim in out and "step_00000002" in out
    assert "resumed from" in out and "at step 2" in out
    # Retrained from step 2, the run ends where the uninterrupted one did.
    final = "checkpoints/step_00000006/model.pt"
    ref, got = load_state(tmp_path / "ref" / final), load_state(tmp_path / "run" / final)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_missing_meta_or_trainer_is_named_not_a_traceback(tmp_path, capsys):
    base = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0}
    assert train.main(job_args(tmp_path, **base)) == 0
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000004" / "trainer.pt").unlink()
    assert train.main(job_args(tmp_path, **{**base, "train.steps": 6}) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "trainer.pt is missing" in out and "at step 2" in out
    (root / "step_00000006" / "meta.json").unlink()  # the newest: incomplete, `latest` still names it
    assert train.main(job_args(tmp_path, **{**base, "train.steps": 6}) + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "not a complete checkpoint" in captured.err + captured.out


def test_library_checkpoint_refuses_a_corrupted_shard(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 8))
    import distopt

    opt = distopt.build_optimizer(model, "galore", rank=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    integrity.save(tmp_path / "c", model, opt)
    (shard,) = (tmp_path / "c").glob("*.distcp")
    _corrupt(shard)
    with pytest.raises(integrity.IntegrityError, match=shard.name):
        integrity.load(tmp_path / "c", model, opt)


@pytest.mark.parametrize("kind", ["block_xxh3", "block_crc32"])  # CRC-32: where xxhash is not installed
@pytest.mark.parametrize("parallel_from", [1024, 1 << 40])  # hashed beside the write, or inline
def test_dcp_files_are_hashed_as_they_are_written_and_match_a_read_back(tmp_path, monkeypatch, parallel_from, kind):
    # Small blocks, so that files span several: the streamed block digests must equal the ones
    # computed by reading the file back, which is what a load verifies against.
    monkeypatch.setattr(integrity, "BLOCK", 4096)
    monkeypatch.setattr(integrity, "PARALLEL_HASH_BYTES", parallel_from)
    if kind == "block_crc32":
        monkeypatch.setattr(integrity, "xxhash", None)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32))
    import distopt

    opt = distopt.build_optimizer(model, "galore", rank=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    reads = []
    real = integrity._block_digest
    monkeypatch.setattr(integrity, "_block_digest", lambda *a: reads.append(a) or real(*a))
    integrity.save(tmp_path / "c", model, opt)
    assert not reads  # nothing was read back to hash it
    manifest = integrity.read_manifest(tmp_path / "c")
    assert set(manifest) == set(integrity.list_files(tmp_path / "c")) - {integrity.COMPLETE_MARKER}
    assert any(d["bytes"] > 3 * 4096 for d in manifest.values())
    for name, digest in manifest.items():
        path = tmp_path / "c" / name
        assert digest == {"bytes": path.stat().st_size, kind: real(path, path.stat().st_size, kind)}
    integrity.load(tmp_path / "c", model, opt)  # verifies every file against the streamed digests
    (shard,) = (tmp_path / "c").glob("*.distcp")
    _corrupt(shard)
    with pytest.raises(integrity.IntegrityError, match=f"{shard.name} is corrupted .*{kind[6:].upper()}"):
        integrity.load(tmp_path / "c", model, opt)


def test_block_digests_read_back_through_mmap_or_read_agree_and_see_one_flipped_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "BLOCK", 1000)
    path = tmp_path / "f"
    data = bytearray(torch.randint(0, 256, (4500,), dtype=torch.uint8).numpy().tobytes())
    path.write_bytes(data)
    for kind in integrity.BLOCK_KINDS:
        mapped = integrity._block_digest(path, len(data), kind)
        with monkeypatch.context() as m:  # a filesystem that cannot map files
            m.setattr(integrity.mmap, "mmap", lambda *a, **k: (_ for _ in ()).throw(OSError("no mmap")))
            assert integrity._block_digest(path, len(data), kind, chunk=300) == mapped
        for where in (0, 999, 1000, 4499):  # block edges and the short last block
            flipped = bytearray(data)
            flipped[where] ^= 1
            path.write_bytes(flipped)
            assert integrity._block_digest(path, len(data), kind) != mapped, (kind, where)
        path.write_bytes(data)
    for kind in integrity.BLOCK_KINDS:  # an empty file (nothing to map) reads back as it was written
        written = {}
        integrity._BlockHashWriter(open(tmp_path / "empty", "wb"), kind, lambda n, d, out=written: out.update(n=n, d=d)).close()
        assert written == {"n": 0, "d": integrity._block_digest(tmp_path / "empty", 0, kind)}


@pytest.mark.skipif(not hasattr(os, "setpriority") or not os.uname().sysname == "Linux", reason="per-thread priority")
def test_verification_on_a_helper_thread_yields_the_cpu_to_the_load_and_the_main_thread_keeps_its_priority(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "f").write_bytes(os.urandom(5000))
    manifest = {"f": integrity.file_digest(tmp_path / "f")}
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def verify_here():
        return integrity.local_problems(tmp_path, manifest), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    with ThreadPoolExecutor(1) as pool:
        problems, helper = pool.submit(verify_here).result()
    assert problems == [] and helper > base
    assert verify_here() == ([], base)


# -- divergence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", ["1e30", "1e6"])  # loss NaN every step; every update skipped
def test_a_diverged_run_stops_with_exit_code_3_and_no_checkpoint_of_it(tmp_path, capsys, lr):
    args = job_args(tmp_path, **{"optim.lr": lr, "train.steps": 20, "checkpoint.every": 1, "checkpoint.keep": 0,
                                 "train.max_bad_steps": 3})
    assert train.main(args) == train.EXIT_DIVERGED
    assert "DIVERGED" in capsys.readouterr().out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] < 20
    for name in _ckpts(run):  # only states from before the first bad step
        model = load_state(run / "checkpoints" / name / "model.pt")
        assert all(torch.isfinite(t).all() for t in model.values())
        trainer = load_state(run / "checkpoints" / name / "trainer.pt")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
        assert losses.get(trainer["step"], 0.0) is not None
    # Strict JSON: no bare NaN anywhere.
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_a_short_nan_storm_is_ridden_out_without_checkpointing_it(tmp_path, monkeypatch, capsys):
    from distopt.job import trainer

    real = trainer.lm_loss
    calls = {"n": 0}

    def poisoned(model, window, **kw):  # steps 3 and 4 see NaN losses (and gradients)
        calls["n"] += 1
        loss = real(model, window, **kw)
        return loss * float("nan") if kw.get("reduction") is None and calls["n"] in (3, 4) else loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)
    args = job_args(tmp_path, **{"train.steps": 8, "checkpoint.every": 1, "checkpoint.keep": 0, "eval.every": 0})
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "step 3: no checkpoint" in out and "step 4: no checkpoint" in out
    assert "step_00000003" not in _ckpts(tmp_path / "run") and "step_00000008" in _ckpts(tmp_path / "run")


# -- kill -9 during a save, disk full, SIGTERM at start -------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_saves_never_leaves_a_checkpoint_that_resumes_wrong(tmp_path, seed):
    args = job_args(tmp_path, **{"train.steps": 200, "checkpoint.every": 1, "checkpoint.keep": 3, "eval.every": 0})
    proc = subprocess.Popen([python(), "-m", "distopt.job.train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(root.glob("step_*"))) < 2:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    newest = ckpt.candidates(root)[0]
    ckpt.verify(newest, train.dist.discover())  # complete checkpoints are intact, byte for byte
    resumed = job_args(tmp_path, **{"train.steps": ckpt.read_meta(newest)["step"] + 2, "checkpoint.every": 1,
                                    "checkpoint.keep": 3, "eval.every": 0})
    done = subprocess.run([python(), "-m", "distopt.job.train", *resumed, "--resume"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {ckpt.read_meta(newest)['step']}" in done.stdout


def test_disk_full_during_a_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, capsys):
    real = integrity.save_file
    calls = {"n": 0}

    def full(obj, path):
        calls["n"] += 1
        if calls["n"] > 4:  # the first checkpoint writes 4 files this way; the second runs out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(integrity, "save_file", full)
    args = job_args(tmp_path, **{"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0})
    assert train.main(args) == train.EXIT_CHECKPOINT_FAILED
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_00000002" in err
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    ckpt.verify(root / "step_00000002", train.dist.discover())


def test_sigterm_in_the_first_seconds_exits_143_and_resume_works(tmp_path):
    args = job_args(tmp_path, **{"train.steps": 400, "eval.every": 0})
    proc = subprocess.Popen([python(), "-m", "distopt.job.train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (train.EXIT_PREEMPTED, -signal.SIGTERM), err[-2000:]
    if proc.returncode == train.EXIT_PREEMPTED:  # it got as far as training: a checkpoint to resume
        done = subprocess.run([python(), "-m", "distopt.job.train", *job_args(tmp_path, **{"train.steps": 400, "eval.every": 0,
                               "train.stop_at": 0}), "--resume", "train.steps=2000"], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=30)
        assert "resumed from" in done.stdout or done.returncode != 0


# -- unpickling ------------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (exec, (f"open({str(_MARKER)!r}, 'w').write('ran')",))


_MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"distopt-payload-{os.getpid()}"


@pytest.mark.parametrize("victim", ["model.pt", "optimizer.pt", "trainer.pt", "rng_rank00000.pt"])
def test_a_planted_pickle_payload_never_runs(tmp_path, capsys, victim):
    _MARKER.unlink(missing_ok=True)
    base = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0}
    assert train.main(job_args(tmp_path, **base)) == 0
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    torch.save({"payload": _Payload()}, newest / victim)
    meta = _meta(newest)  # an attacker who also rewrites the manifest
    meta["digests"][victim] = integrity.file_digest(newest / victim)
    (newest / "meta.json").write_text(json.dumps(meta))
    train.main(job_args(tmp_path, **{**base, "train.steps": 6}) + ["--resume"])
    assert not _MARKER.exists(), f"a payload in {victim} ran"
    captured = capsys.readouterr()
    assert victim in captured.out + captured.err


def test_the_zero_converter_never_unpickles_a_payload(tmp_path):
    pytest.importorskip("deepspeed")
    from distopt.engines import deepspeed as ds

    _MARKER.unlink(missing_ok=True)
    planted = tmp_path / "planted.pt"
    torch.save({"format": ds.FULL_FORMAT, "payload": _Payload()}, planted)
    with pytest.raises(ValueError, match="does not unpickle"):
        ds.safe_load(str(planted))
    with pytest.raises(ValueError, match="does not unpickle"):
        ds.load_full_state(object(), str(planted))
    assert not _MARKER.exists()



def test_a_changed_hyperparameter_on_resume_is_applied_and_announced(tmp_path, capsys):
    base = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0, "train.stop_at": 2}
    assert train.main(job_args(tmp_path, **base)) == 0
    changed = {**base, "train.stop_at": 0, "optim.hparams.scale": 0.5, "optim.weight_decay": 0.05}
    assert train.main(job_args(tmp_path, **changed) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: matrix group scale: 0.25 in the checkpoint -> 0.5 now (applied)" in out
    assert "weight_decay: 0.0 in the checkpoint -> 0.05 now (applied)" in out


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").write_text("a file where the job wants a folder")
    assert train.main(job_args(tmp_path)) == 2
    assert "is a file, where the job needs a folder" in capsys.readouterr().err
    (tmp_path / "run").unlink()
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    assert train.main(job_args(tmp_path)) == 2
    assert "metrics.jsonl is a folder" in capsys.readouterr().err
    (tmp_path / "run" / "metrics.jsonl").rmdir()

    class Tiny:
        free = 1000

    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: Tiny)
    assert train.main(job_args(tmp_path)) == 2
    assert "free, but one checkpoint needs about" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was started


def test_a_corrupted_fsdp2_shard_is_named_and_two_ranks_fall_back_together(tmp_path):
    base = {"engine.name": "fsdp2", "train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0, "eval.every": 0,
            "train.batch_size": 2}
    ok(launch_ranks(2, job_args(tmp_path, **base)))
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    shard = sorted((newest / "dcp").glob("*.distcp"))[0]
    _corrupt(shard)
    out = ok(launch_ranks(2, job_args(tmp_path, **{**base, "train.steps": 6}) + ["--resume"]))
    assert "WARNING: cannot resume" in out and shard.name in out and "at step 2" in out
