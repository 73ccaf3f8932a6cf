"""CUDA checks of numerics and checkpoint paths that the CPU tests cover: the transform moment map's
identity and bias-correction invariance, the device-drawn sketches against the CPU's (the same
numbers), the closed-form GaLore step with TF32 off and on, a DCP
checkpoint of CUDA tensors (verified; a corrupted shard refused), and the training job on CUDA in
bf16-mixed (a corrupted newest checkpoint falls back loudly; a diverged run exits 3).

    python benchmarks/gpu_checks.py          # writes runs/gpu_checks/gpu_checks.json ($OUT if set)

It runs on CPU too, where it checks nothing CUDA-specific. Prints JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import distopt  # noqa: E402
from distopt import checkpoint as integrity  # noqa: E402
from distopt.core import moments, projector  # noqa: E402

WORK = ROOT / "runs" / "gpu_checks"


def transform_checks(dev: str) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    old = torch.linalg.qr(torch.randn(64, 8, device=dev, generator=g))[0]
    new = torch.linalg.qr(old + 0.5 * torch.randn(64, 8, device=dev, generator=g))[0]
    c = projector.change_of_basis(new, old, "left", None)
    unseen = projector.unseen_fraction(new, old, c, "left", None)
    mean = torch.randn(8, 32, device=dev, generator=g)
    second = mean.square() + torch.rand(8, 32, device=dev, generator=g)
    mapped = []
    for t in (3, 500):
        c1, c2 = 1 - 0.9**t, 1 - 0.999**t
        m, v = mean * c1, second * c2
        moments.apply_moment_policy("transform", "left", c, m, v, step=t, betas=(0.9, 0.999), unseen=unseen)
        mapped.append((m / c1, v / c2))
    m, v = mean.clone(), second.clone()
    moments.apply_moment_policy("transform", "left", torch.eye(8, device=dev), m, v, step=5, betas=(0.9, 0.999))
    return {"transform_invariance_maxdiff": max((a - b).abs().max().item() for a, b in zip(*mapped)),
            "transform_identity_maxrel": ((v - second).abs() / second).max().item()}


def sketch_checks(dev: str) -> dict:
    """The device's seeded sketch against the same counter draw on the CPU (the same numbers, up to a
    last-bit difference of fp64 log/cos), and its time against a CPU draw copied over."""
    from distopt.core import linalg

    shape, seed = (4096, 1040), linalg.stable_seed(0, "layers.0.mlp.up_proj", 1, "range")
    here = linalg.counter_gaussian(shape, seed, dev)
    out = {"sketch_drawn_by_counter": torch.equal(linalg.seeded_gaussian(shape, seed, dev), here)}  # False on CPU
    here, there = here.cpu(), linalg.counter_gaussian(shape, seed, "cpu")
    cpu = torch.Generator().manual_seed(seed)
    timings = {}
    for label, draw in (("device", lambda: linalg.seeded_gaussian(shape, seed, dev)),
                        ("cpu_copied", lambda: torch.randn(shape, generator=cpu).to(dev))):
        draw()
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            draw()
        if dev == "cuda":
            torch.cuda.synchronize()
        timings[f"sketch_4096x1040_{label}_ms"] = (time.perf_counter() - start) / 5 * 1e3
    return {**out, "sketch_device_vs_cpu_maxdiff": (here - there).abs().max().item(),
            "sketch_device_vs_cpu_differing": int((here != there).sum()), **timings}


def in_place_adam_checks(dev: str) -> dict:
    """Whether the device's fused AdamW kernel passes the probe for writing Adam's direction over
    the projection it reads (else the batched step takes the eager ops), and, at a 7B MLP batch's
    size, whether that direction equals the fused Adam kernel's into a zeroed buffer, bit for bit."""
    from distopt.core import batching

    generator = torch.Generator().manual_seed(0)
    low = torch.randn(4, 1024, 4096, generator=generator).to(dev)
    avg = (torch.randn(4, 1024, 4096, generator=generator) * 0.1).to(dev)
    avg_sq = (torch.rand(4, 1024, 4096, generator=generator) * 0.01).to(dev)
    counts = [torch.full((), 7.0, device=dev)]
    expected, moments = torch.zeros_like(low), (avg.clone(), avg_sq.clone())
    batching.scaled_adam_directions([moments[0]], [moments[1]], [low.clone()], [expected], counts, 1.0, 0.9, 0.999, 1e-8)
    written = batching.adam_directions_in_place([avg], [avg_sq], [low], counts, 0.9, 0.999, 1e-8)
    return {"in_place_adam_probe_passed": batching._in_place_adam_safe(torch.device(dev)),
            "in_place_adam_written": written,
            "in_place_adam_equal": bool(written and torch.equal(low, expected) and torch.equal(avg, moments[0])
                                        and torch.equal(avg_sq, moments[1]))}


def closed_form_checks(dev: str) -> dict:
    out = {}
    g = torch.Generator(device=dev).manual_seed(1)
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        grad = torch.randn(256, 128, device=dev, generator=g)
        w0 = torch.randn(256, 128, device=dev, generator=g)
        w = torch.nn.Parameter(w0.clone())
        opt = distopt.optim.GaLore([{"params": [w], "param_names": ["l.q_proj.weight"], "kind": "matrix", "roles": ["q"]}],
                                   lr=1e-3, weight_decay=0.1, scale=0.25, eps=1e-12, rank=16, update_proj_gap=1000)
        expected = w0.clone()
        for _ in range(4):
            w.grad = grad.clone()
            opt.step()
            basis = opt.state[w]["basis"]
            expected = expected * (1 - 1e-4) - 1e-3 * 0.25 * ((grad @ basis).sign() @ basis.T)
        out[f"closed_form_maxdiff_tf32_{tf32}"] = (w.detach() - expected).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def dcp_checks(dev: str) -> dict:
    from helpers import tiny_model

    model = tiny_model().to(dev)
    opt = distopt.build_optimizer(model, "grassjump", rank=8, update_proj_gap=3)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    folder = WORK / "ck"
    start = time.perf_counter()
    integrity.save(folder, model, opt)
    out = {"dcp_save_s": time.perf_counter() - start}
    start = time.perf_counter()
    integrity.load(folder, model, opt)
    out["dcp_load_verified_s"] = time.perf_counter() - start
    shard = sorted(folder.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        integrity.load(folder, model, opt)
        out["corrupted_shard"] = "LOADED (wrong)"
    except integrity.IntegrityError as err:
        out["corrupted_shard"] = "refused: " + str(err)[-120:]
    return out


def job_checks(dev: str) -> dict:
    def job(*extra):
        precision = "bf16-mixed" if dev == "cuda" else "fp32"
        return subprocess.run(
            [sys.executable, "-m", "distopt.job.train", "--config", "tiny_cpu", f"engine.device={dev}", "engine.name=single",
             f"train.precision={precision}", "eval.every=0", "log.plot=false", "log.progress=lines",
             "data.glob=json/*.py", "data.val_percent=20", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300)

    run = WORK / "job"
    out = {"job_rc": job("train.steps=40", "checkpoint.every=20", "checkpoint.keep=0", f"out_dir={run}").returncode}
    newest = sorted((run / "checkpoints").glob("step_*"))[-1] / "model.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = job("train.steps=60", "checkpoint.every=20", "checkpoint.keep=0", f"out_dir={run}", "--resume")
    out["resume_rc"] = resumed.returncode
    out["resume_lines"] = [line for line in resumed.stdout.splitlines() if "WARNING" in line or "resumed" in line][:3]
    diverged = job("train.steps=30", "schedule.warmup_steps=2", "optim.lr=1e30", f"out_dir={WORK / 'diverged'}",
                   "train.max_bad_steps=3")
    out["diverged_rc"] = diverged.returncode
    return out


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    for checks in (transform_checks, sketch_checks, in_place_adam_checks, closed_form_checks, dcp_checks, job_checks):
        out.update(checks(dev))
    text = json.dumps(out, indent=1)
    print(text)
    target = Path(os.environ.get("OUT") or WORK)
    target.mkdir(parents=True, exist_ok=True)
    (target / "gpu_checks.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
