"""The training job end to end: outputs, validation before any work, and 2 DDP ranks."""

from __future__ import annotations

import json

import pytest
from jobutil import free_port, job_args, python, run

from distopt.job import train
from distopt.job.config import ConfigError, load_config


def test_single_process_run_writes_metrics_summary_and_checkpoint(tmp_path, capsys):
    args = job_args(tmp_path, impl="hf", **{"log.plot": "true"})
    assert train.main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 4, 6, 8]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "state_bytes"):
        assert key in steps[-1], key
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 1 and summary["engine"] == "single"
    assert 0 < summary["state_bytes"] < summary["adamw_state_bytes"]
    assert (run_dir / "checkpoints" / "step_00000008" / "meta.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    pytest.importorskip("matplotlib")
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert "val loss" in out and "vs AdamW" in out and str(run_dir / "loss.png") in out


def test_a_single_process_job_steps_a_model_whose_same_shape_weights_are_packed(tmp_path, monkeypatch):
    import distopt.api

    packed = []
    real = distopt.api.pack_weights
    monkeypatch.setattr(distopt.api, "pack_weights", lambda model: packed.append((model, real(model))) or packed[-1][1])
    assert train.main(job_args(tmp_path, **{"train.steps": 2, "eval.every": 0})) == 0
    (model, moved), = packed
    attention = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.o_proj.weight]
    assert moved > 0 and attention[0].untyped_storage().data_ptr() == attention[1].untyped_storage().data_ptr()


def test_bad_values_are_refused_with_key_value_and_allowed(tmp_path, capsys):
    args = job_args(tmp_path) + ["--train.steps", "0", "--train.precision=fp16", "optim.hparams.rank=-3", "--lern_rate", "1"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "train.steps=0: must be >= 1" in err
    assert "train.precision='fp16': must be one of fp32, bf16-mixed, bf16" in err
    assert "unknown key 'lern_rate'" in err
    # The optimizer's own checks run on a meta-device model, still before any work.
    assert train.main(job_args(tmp_path, **{"optim.hparams.rank": -3})) == 2
    assert "rank=-3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_and_override_forms(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\noptim:\n  name: adamw\n  hparams: {}\n")
    cfg = load_config(path, ["--steps", "9", "optim.lr=2e-3", "--optim.betas=0.9,0.95", "--resume"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.betas, cfg.checkpoint.resume) == (9, 2e-3, [0.9, 0.95], "auto")
    path.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'.*Did you mean 'train.steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(None, ["--every", "3"])


@pytest.mark.distributed
def test_two_ddp_ranks_under_torchrun(tmp_path):
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/train.py"] + job_args(tmp_path, **{"train.steps": 4, "eval.every": 2})
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "ddp" and summary["steps"] == 4
    assert "ddp x 2 ranks (gloo, cpu)" in proc.stdout
    assert proc.stdout.count("distopt train") == 1  # only rank 0 talks


@pytest.mark.parametrize("name", __import__("distopt").list_optimizers())
def test_every_registered_optimizer_trains_and_resumes(tmp_path, name):
    import inspect

    from distopt.optim import REGISTRY

    hparams = {"optim.hparams.rank": 4} if "rank" in inspect.signature(REGISTRY[name].__init__).parameters else {}
    base = {"optim.name": name, "optim.hparams": "{}", "train.steps": 3, "eval.every": 0, "train.stop_at": 2}
    assert train.main(job_args(tmp_path, **base) + [f"{k}={v}" for k, v in hparams.items()]) == 0
    base.pop("train.stop_at")
    assert train.main(job_args(tmp_path, **base) + [f"{k}={v}" for k, v in hparams.items()] + ["--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["state_bytes"] > 0


def test_numbers_in_yaml_hparams_are_numbers_even_without_a_dot(tmp_path):
    # YAML 1.1 reads 5e-1 as a string; the job reads it as the number it is.
    from distopt.job.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  name: galore\n  hparams:\n    scale: 5e-1\n    rank: 8\n    refresh: svd\n")
    cfg = load_config(str(path), ["optim.hparams.update_proj_gap=1e2"])
    assert cfg.optim.hparams == {"scale": 0.5, "rank": 8, "refresh": "svd", "update_proj_gap": 100}
    assert isinstance(cfg.optim.hparams["update_proj_gap"], int)


@pytest.mark.parametrize("name", ["rso", "galore"])
def test_the_summary_compares_state_with_adamw_on_the_model_as_given(tmp_path, capsys, name):
    # RSO rewrites the model (frozen weights plus trainable factors): AdamW's state and the
    # parameter count must still be those of the model the user gave, and RSO's projections count.
    import torch

    import distopt
    from distopt.job.modeling import build_model, load_shape

    hparams = '{"rank": 8}' if name == "rso" else '{"rank": 8, "update_proj_gap": 3}'
    args = job_args(tmp_path, **{"optim.name": name, "optim.hparams": hparams, "train.steps": 2, "eval.every": 0})
    assert train.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    model = build_model(load_shape(args[0].split("=", 1)[1]), "native")
    reference = distopt.build_optimizer(model, "adamw")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reference.step()
    assert summary["num_params"] == sum(p.numel() for p in model.parameters())
    assert summary["adamw_state_bytes"] == distopt.state_bytes(reference)
    assert summary["state_bytes"] < summary["adamw_state_bytes"]
    assert "smaller" in capsys.readouterr().out
