"""The training job's sharded engines: FSDP2, HSDP and DeepSpeed ZeRO against DDP, and their checkpoints.

Every multi-rank run trains the micro model with the same seed and data as one DDP reference run
(2 ranks, 6 sequences per micro-batch, 2 micro-batches per step, clipping on), so the losses of
each step must agree to float tolerance: the engines change where tensors live, not the numbers.
A run that resumes on another number of ranks keeps the global batch (2 x 6 = 3 x 4 sequences per
micro-step): the samples of every step are then the same, and so are the losses.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from jobutil import REPO, env, free_port, job_args, launch_ranks, ok

from distopt.job import train
from distopt.job.config import load_config
from distopt.job.dist import DistInfo
from distopt.job.ds_config import deepspeed_config

STEPS = 4
BASE = {"train.steps": STEPS, "train.batch_size": 6, "train.grad_accum": 2, "eval.every": 2, "log.every": 1}
RTOL, ATOL = 1e-5, 1e-6
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def grad_norms(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if r["kind"] == "train"}


def val_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=RTOL, abs=ATOL), (step, got, want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The DDP run every engine is compared with."""
    tmp = tmp_path_factory.mktemp("ddp")
    ok(launch_ranks(2, job_args(tmp, "ddp", **BASE, **{"engine.name": "ddp"})))
    return tmp / "ddp"


# -- FSDP2 / HSDP ------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_fsdp2_matches_ddp_and_resumes_on_three_ranks_and_on_one(tmp_path, reference):
    ref = losses(reference)
    args = job_args(tmp_path, **BASE, **{"engine.name": "fsdp2"})
    out = ok(launch_ranks(2, args + ["train.stop_at=2"]))
    assert "fsdp2 mesh (2) of 2 rank(s)" in out
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and not list(ckpt.glob("model*.pt"))
    assert_same_losses(losses(tmp_path / "run"), ref, [1, 2])

    # The same checkpoint, on 3 ranks with 4 sequences each: the same samples per step.
    out = ok(launch_ranks(3, args + ["train.batch_size=4", "--resume"]))
    assert "resumed from" in out and "global batch changed" not in out
    got = losses(tmp_path / "run")
    assert_same_losses(got, ref, [1, 2, 3, 4])
    assert val_losses(tmp_path / "run")[STEPS] == pytest.approx(val_losses(reference)[STEPS], rel=RTOL)

    # And on one process (fsdp2 over a mesh of one rank), in this process.
    one = job_args(tmp_path, "one", **{**BASE, "engine.name": "fsdp2", "train.batch_size": 12, "checkpoint.resume": str(ckpt)})
    assert train.main(one) == 0
    assert_same_losses(losses(tmp_path / "one"), ref, [3, 4])


@pytest.mark.distributed
def test_hsdp_with_two_replicas_matches_ddp(tmp_path, reference):
    args = job_args(tmp_path, **BASE, **{"engine.name": "hsdp", "engine.hsdp_replicas": 2, "train.stop_at": 2})
    out = ok(launch_ranks(2, args))
    assert "hsdp mesh (2 x 1) of 2 rank(s)" in out
    assert_same_losses(losses(tmp_path / "run"), losses(reference), [1, 2])


@pytest.mark.distributed
def test_ddp_projected_grad_sync_matches_the_full_sync(tmp_path):
    """galore, gradient accumulation, several refreshes, a checkpoint and resume: the optimizer's
    averages of projections and sketches give DDP's numbers, and the banner says what is synced how."""
    common = {**BASE, "engine.name": "ddp", "train.clip_grad_norm": 0}
    ok(launch_ranks(2, job_args(tmp_path, "full", **common)))
    args = job_args(tmp_path, "projected", **common, **{"engine.grad_sync": "projected"})
    out = ok(launch_ranks(2, args + ["train.stop_at=2"]))
    assert "grad_sync=projected: 14 matrices averaged through their projections over 2 replicas" in out
    assert (tmp_path / "projected" / "checkpoints" / "step_00000002" / "optimizer.pt").is_file()
    assert "resumed from" in ok(launch_ranks(2, args + ["--resume"]))  # replicas hold one state: rank 0's file
    assert_same_losses(losses(tmp_path / "projected"), losses(tmp_path / "full"), range(1, STEPS + 1))
    assert val_losses(tmp_path / "projected")[STEPS] == pytest.approx(val_losses(tmp_path / "full")[STEPS], rel=RTOL)
    # Clipping on: the norm of what is synced (optimizer.clip_grad_norm_), logged from rank 0.
    ok(launch_ranks(2, job_args(tmp_path, "clipped", **{**common, "train.clip_grad_norm": 0.05,
                                                         "engine.grad_sync": "projected"})))
    norms = grad_norms(tmp_path / "clipped")
    assert all(0.05 < norm < 100 for norm in norms.values()), norms
    assert losses(tmp_path / "clipped")[STEPS] != pytest.approx(losses(tmp_path / "projected")[STEPS], rel=1e-4)


@pytest.mark.distributed
def test_hsdp_projected_grad_sync_matches_hsdp_and_resumes(tmp_path):
    """Two replica groups, each a plain FSDP2 run on its shard sub-mesh, averaged by the optimizer:
    the losses of HSDP's own sync, and a DCP checkpoint (both groups hold the same shards) that
    resumes into the same run."""
    common = {**BASE, "engine.name": "hsdp", "engine.hsdp_replicas": 2, "train.clip_grad_norm": 0}
    ok(launch_ranks(2, job_args(tmp_path, "full", **common)))
    args = job_args(tmp_path, "projected", **common, **{"engine.grad_sync": "projected"})
    out = ok(launch_ranks(2, args + ["train.stop_at=2"]))
    assert "grad_sync=projected: 14 matrices averaged through their projections over 2 replica groups" in out
    assert_same_losses(losses(tmp_path / "projected"), losses(tmp_path / "full"), [1, 2])
    out = ok(launch_ranks(2, args + ["--resume"]))
    assert "resumed from" in out
    assert_same_losses(losses(tmp_path / "projected"), losses(tmp_path / "full"), range(1, STEPS + 1))
    assert all(0 < norm < 100 for norm in grad_norms(tmp_path / "projected").values())  # the synced norm
    assert val_losses(tmp_path / "projected")[STEPS] == pytest.approx(val_losses(tmp_path / "full")[STEPS], rel=RTOL)


# -- DeepSpeed ZeRO ------------------------------------------------------------------------------------
@needs_deepspeed
@pytest.mark.distributed
def test_zero2_matches_ddp_and_resumes_on_the_same_number_of_ranks(tmp_path, reference):
    ref = losses(reference)
    args = job_args(tmp_path, **BASE, **{"engine.name": "zero2"})
    out = ok(launch_ranks(2, args + ["train.stop_at=2"]))
    assert "zero2 x 2 rank(s) (DeepSpeed" in out
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (ckpt / "deepspeed" / "zero").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_same_losses(losses(tmp_path / "run"), ref, [1, 2])
    # The logged norm is DeepSpeed's, before its clipping (to train.clip_grad_norm), and equals DDP's.
    assert_same_losses(grad_norms(tmp_path / "run"), grad_norms(reference), [1, 2])
    assert grad_norms(reference)[1] > 1.0  # so clipping acted

    # On 3 ranks the ZeRO partitions differ: the job merges the state and takes the new shares.
    three = job_args(tmp_path, "three", **{**BASE, "engine.name": "zero2", "train.batch_size": 4,
                                           "checkpoint.resume": str(ckpt)})
    results = launch_ranks(3, three)
    out = ok(results)
    assert "resumed from" in out
    assert "written by 2 data-parallel ranks and this run has 3" in results[0].stdout + results[0].stderr
    assert_same_losses(losses(tmp_path / "three"), ref, [3, 4])
    assert not list((tmp_path / "three" / "checkpoints").glob(".*merged.pt"))

    out = ok(launch_ranks(2, args + ["--resume"]))
    assert "resumed from" in out
    assert_same_losses(losses(tmp_path / "run"), ref, [1, 2, 3, 4])


@needs_deepspeed
@pytest.mark.distributed
def test_zero3_matches_ddp(tmp_path, reference):
    args = job_args(tmp_path, **BASE, **{"engine.name": "zero3", "train.stop_at": 2})
    ok(launch_ranks(2, args))
    assert_same_losses(losses(tmp_path / "run"), losses(reference), [1, 2])


@needs_deepspeed
@pytest.mark.distributed
def test_deepspeed_launcher_with_a_shipped_config(tmp_path):
    """``deepspeed launch/train.py --deepspeed_config ...``: the stage, bf16 and the scheduler come from
    the JSON; the command line shrinks its model-size hyper-parameters for the micro model."""
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.is_file():
        pytest.skip("the deepspeed launcher is not installed next to this interpreter")
    args = [a for a in job_args(tmp_path, **{"train.steps": 3, "eval.every": 0}) if not a.startswith("schedule.")]
    cmd = [str(launcher), "--num_accelerators", "2", "--master_port", str(free_port()), "launch/train.py",
           "--deepspeed_config", "configs/ds/zero2_galore.json", "--deepspeed", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["steps"]) == ("zero2", 2, 3)
    assert "sets bf16.enabled=true" in proc.stdout and "optim.hparams.rank=8 from the command line" in proc.stdout
    assert "(WarmupLR) sets the learning rate" in proc.stdout
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "precision: bf16-mixed" in config and "name: zero2" not in config  # engine.name stays auto
    # WarmupLR (0 -> 1e-3 over 1000 steps) sets the lr: the job's own schedule (peak 0.01) does not.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert all(0 <= lr < 1e-5 for lr in lrs) and lrs == sorted(lrs), lrs


# -- before any work ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    ({"engine.name": "hsdp", "engine.hsdp_replicas": 2}, "engine.hsdp_replicas=2: must divide the world size"),
    ({"engine.name": "zero2", "optim.name": "rso", "optim.hparams": "{}"}, "Use engine.name=fsdp2 (or ddp) for rso"),
    ({"engine.name": "zero3", "engine.deepspeed_config": "configs/ds/zero2_galore.json"},
     "engine.name=zero3 but engine.deepspeed_config='configs/ds/zero2_galore.json' has zero_optimization.stage=2"),
    ({"engine.name": "ddp", "engine.deepspeed_config": "configs/ds/zero2_galore.json"}, "only the zero1/zero2/zero3 engines read it"),
    ({"engine.name": "fsdp2", "engine.grad_sync": "projected"}, "engine fsdp2 does not offer it yet"),
    ({"engine.grad_sync": "projected"}, "engine single does not have (one process)"),
])
def test_engine_misconfigurations_fail_before_any_work(tmp_path, capsys, extra, message):
    if str(extra.get("engine.name", "")).startswith("zero"):
        pytest.importorskip("deepspeed")
    assert train.main(job_args(tmp_path, **extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written


@needs_deepspeed
def test_deepspeed_json_refusals(tmp_path, capsys):
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    adam = tmp_path / "adam.json"
    adam.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 1}}))
    stage0 = tmp_path / "stage0.json"
    stage0.write_text("{}")
    for path, message in [(fp16, "fp16/AMP training is not supported"), (adam, "the training job trains distopt optimizers"),
                          (stage0, "zero_optimization.stage=0")]:
        assert train.main(job_args(tmp_path, **{"engine.deepspeed_config": str(path)})) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_precedence(tmp_path):
    """Run config file < DeepSpeed JSON < command line; the value used is written back into the config."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "train_batch_size": 32, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "optimizer": {"type": "distopt.galore", "params": {"lr": 0.002, "rank": 64, "scale": 0.5, "update_proj_gap": 100}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    }))
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  batch_size: 4\n  clip_grad_norm: 0.5\noptim:\n  name: galore\n  hparams: {rank: 16, scale: 1.0}\n")
    cfg = load_config(run, [f"--engine.deepspeed_config={ds}", "--optim.hparams.rank", "8", "--lr", "0.003"])
    config, notes = deepspeed_config(cfg, DistInfo(world_size=4), stage=2)
    # train_batch_size / (accumulation x ranks) = 4 sequences per micro-batch; the JSON's accumulation wins.
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.precision) == (4, 2, "bf16-mixed")
    assert config["gradient_clipping"] == 0.5  # the JSON has none: the run config fills it
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "distopt.galore"
    assert (params["lr"], params["rank"], params["scale"], params["update_proj_gap"]) == (0.003, 8, 0.5, 100)
    assert (cfg.optim.lr, cfg.optim.hparams) == (0.003, {"rank": 8, "scale": 0.5, "update_proj_gap": 100})
    assert "scheduler" in config and config["steps_per_print"] >= 10**6
    text = "\n".join(notes)
    assert "optim.hparams.rank=8 from the command line replaces optimizer.params.rank=64" in text
    assert "sets optimizer.params.scale=0.5: optim.hparams.scale 1.0 -> 0.5" in text
    assert "(WarmupLR) sets the learning rate" in text
    # Resolving again changes nothing (the engine rebuilds the config at setup).
    again, _ = deepspeed_config(cfg, DistInfo(world_size=4), stage=2)
    assert again == config
    # A schedule key on the command line takes the learning rate back from the JSON's scheduler.
    cfg = load_config(run, [f"--engine.deepspeed_config={ds}", "--schedule.warmup_steps", "3"])
    config, notes = deepspeed_config(cfg, DistInfo(world_size=4), stage=2)
    assert "scheduler" not in config and any("the job's schedule sets the learning rate" in n for n in notes)


def test_deepspeed_style_arguments():
    config, rest = train.split_argv(["--local_rank=1", "--deepspeed", "--deepspeed_config", "ds.json", "--steps", "3"])
    assert config is None and rest == ["--deepspeed_config", "ds.json", "--steps", "3"]
    cfg = load_config(None, rest[2:] + ["--deepspeed_config", "configs/ds/zero2_galore.json"])
    assert cfg.engine.deepspeed_config == "configs/ds/zero2_galore.json" and cfg.engine.name == "auto"
    _, rest = train.split_argv(["--deepscale_config=x.json"])
    assert rest == ["--engine.deepspeed_config=x.json"]


def test_bf16_runs_reduce_gradients_in_fp32_unless_told_otherwise(tmp_path):
    from distopt.job.engines import FSDP2Engine

    for precision in ("bf16", "bf16-mixed"):
        for reduce, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            cfg = load_config(None, [f"train.precision={precision}", f"train.reduce_dtype={reduce}"])
            assert str(FSDP2Engine(cfg, DistInfo(), None).mp_policy().reduce_dtype) == f"torch.{dtype}"
            if importlib.util.find_spec("deepspeed") is not None:
                config, _ = deepspeed_config(cfg, DistInfo(world_size=2), stage=2)
                assert config["communication_data_type"] == reduce
    for path in sorted((REPO / "configs" / "ds").glob("*.json")):  # the shipped bf16 configs reduce in fp32
        shipped = json.loads(path.read_text())
        assert not shipped.get("bf16", {}).get("enabled") or shipped["communication_data_type"] == "fp32", path.name
