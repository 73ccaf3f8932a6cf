"""The engines on one CUDA device under NCCL: the training job at world size 1 on every engine in
bf16-mixed, and the layer-wise mode on a FSDP2-sharded LLaMA-1B against a plain ``step()``.

    python benchmarks/gpu_engines.py                 # writes runs/gpu_engines/gpu_engines.json ($OUT if set)
    python benchmarks/gpu_engines.py --device cpu --tiny   # the same logic on CPU with gloo

Engine rows: ``single``, ``ddp``, ``fsdp2``, ``hsdp`` and ``zero1/2/3`` (the last three only when
DeepSpeed imports) run ``launch/train.py`` under ``torchrun --nproc_per_node 1`` on the same data
and seed; each row gives the exit code, the final train and validation loss, ms per step and the
distance of its final loss from ``single``'s. A row that fails keeps the tail of its output.

Layer-wise row: ``distopt.models`` LLaMA-1B shapes, FSDP2 (``MixedPrecisionPolicy(bf16, fp32)``) on
a one-rank NCCL mesh, GaLore; the same steps with ``optimizer.step()`` and with
``distopt.engines.layerwise.attach``: peak memory, median step time and the largest weight
difference between the two after the same steps. Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

WORK = ROOT / "runs" / "gpu_engines"
ENGINES = ("single", "ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3")


def _deepspeed_imports() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the rows are skipped
        return False
    return True


def _tail(text: str) -> str:
    """The failing rank's own output, without torchrun's wrapper traceback."""
    own = re.split(r"^E\d{4} .*elastic", text, maxsplit=1, flags=re.M)[0]
    return own[-2500:]


def engine_row(engine: str, args) -> dict:
    out_dir = WORK / engine
    precision = "bf16-mixed" if args.device == "cuda" else "fp32"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "launch" / "train.py"), "--config", "tiny_cpu", f"engine.name={engine}",
           f"engine.device={args.device}", f"train.precision={precision}", f"train.steps={args.steps}",
           "schedule.warmup_steps=5", "eval.every=0", "log.plot=false", "log.progress=lines",
           f"checkpoint.every={args.steps // 2}", "checkpoint.keep=0", f"out_dir={out_dir}"]
    if engine == "hsdp":
        cmd.append("engine.hsdp_replicas=1")
    if engine.startswith("zero"):
        cmd.append(f"engine.deepspeed_config={ROOT / 'configs' / 'ds' / f'{engine}_galore.json'}")
        # The shipped DS configs carry 1B-scale settings; the run config's optimizer settings win.
        cmd += ["optim.hparams.rank=32", "optim.hparams.update_proj_gap=50", "optim.lr=0.003"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    row = {"engine": engine, "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    summary = out_dir / "summary.json"
    if proc.returncode == 0 and summary.is_file():
        data = json.loads(summary.read_text())
        row.update({k: data.get(k) for k in ("final_train_loss", "final_val_loss", "step_time_s", "tokens_per_s",
                                                     "peak_mem_bytes", "peak_mem_kind", "state_bytes")})
    else:
        row["tail"] = _tail(proc.stdout + proc.stderr)
    return row


def _final_losses(row: dict, out_dir: Path) -> None:
    """The last logged train loss from metrics.jsonl (independent of summary.json's key names)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return
    train = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in train if "loss" in r and r.get("kind", "train") == "train"]
    if losses:
        row["last_logged_loss"] = losses[-1]


def layerwise_worker(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import distopt
    from distopt.engines import layerwise
    from distopt.models import LlamaShape, TinyLlama

    dev = args.device
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    backend = "nccl" if dev == "cuda" else "gloo"
    dist.init_process_group(backend)
    if dev == "cuda":
        torch.cuda.set_device(0)
    mesh = init_device_mesh(dev, (1,))
    if args.tiny:
        shape = LlamaShape(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128)
        batch, seq, rank, steps = 2, 64, 8, 3
    else:
        shape = LlamaShape(vocab_size=32000, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
                           num_attention_heads=32, max_position_embeddings=1024)
        batch, seq, rank, steps = args.batch, 1024, 512, args.layerwise_steps
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    gen = torch.Generator(device=dev).manual_seed(1)
    batches = [torch.randint(0, shape.vocab_size, (batch, seq), generator=gen, device=dev) for _ in range(steps)]

    initial: dict[str, torch.Tensor] = {}

    def run(mode: str) -> tuple[dict, dict]:
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated() if dev == "cuda" else None
        torch.manual_seed(0)
        with torch.device(dev):
            model = TinyLlama(shape)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if not initial:
            initial.update({n: p.full_tensor().detach().float().cpu().clone() for n, p in model.named_parameters()})
        optimizer = distopt.build_optimizer(model, "galore", rank=rank, update_proj_gap=200, lr=1e-3, scale=0.25)
        handle = layerwise.attach(optimizer) if mode == "layerwise" else None
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, after_backward = [], None
        for ids in batches:
            start = time.perf_counter()
            model(ids, ids).backward()
            if after_backward is None and dev == "cuda":  # gradients still alive when backward returns
                after_backward = torch.cuda.memory_allocated() - baseline
            if handle is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        row = {"mode": mode, "first_ms": round(times[0], 1), "median_ms": round(statistics.median(times[1:] or times), 1),
               "peak_bytes": torch.cuda.max_memory_allocated() - baseline if dev == "cuda" else None,
               "baseline_bytes": baseline, "after_backward_bytes": after_backward,
               "after_bytes": torch.cuda.memory_allocated() - baseline if dev == "cuda" else None,
               "state_bytes": distopt.state_bytes(optimizer)}
        weights = {n: p.full_tensor().detach().float().cpu().clone() for n, p in model.named_parameters()}
        if handle is not None:
            handle.remove()
        del model, optimizer, handle
        return row, weights

    lw, w_lw = run("layerwise")
    plain, w_plain = run("step")
    again, w_again = run("step")  # the run-to-run floor of the device's own non-determinism

    def diff(a, b, names):
        return max(((a[n] - b[n]).abs().max().item() for n in names), default=None)

    matrices = [n for n, w in w_plain.items() if w.ndim == 2 and "embed" not in n and "lm_head" not in n]
    others = [n for n in w_plain if n not in matrices]
    out = {"shape": "tiny" if args.tiny else "llama-1b", "batch": batch, "seq": seq, "rank": rank, "steps": steps,
           "backend": backend, "deterministic": args.deterministic, "rows": [plain, lw, again],
           "max_weight_change_low_rank_matrices": diff(w_plain, initial, matrices),
           "layerwise_vs_step": {"low_rank_matrices": diff(w_lw, w_plain, matrices), "element_wise": diff(w_lw, w_plain, others)},
           "step_vs_step": {"low_rank_matrices": diff(w_again, w_plain, matrices), "element_wise": diff(w_again, w_plain, others)}}
    if plain["peak_bytes"] and lw["peak_bytes"]:
        out["peak_saved_bytes"] = plain["peak_bytes"] - lw["peak_bytes"]
    dist.destroy_process_group()
    return out


def layerwise_row(args) -> dict:
    result = WORK / "layerwise.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           "--layerwise-worker", "--device", args.device, "--result", str(result),
           "--batch", str(args.batch), "--layerwise-steps", str(args.layerwise_steps),
           "--deterministic" if args.deterministic else "--no-deterministic"] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode == 0 and result.is_file():
        return {"rc": 0, **json.loads(result.read_text())}
    return {"rc": proc.returncode, "tail": _tail(proc.stdout + proc.stderr)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--steps", type=int, default=40, help="job steps per engine row")
    p.add_argument("--tiny", action="store_true", help="layer-wise row at a tiny shape (CPU check of the logic)")
    p.add_argument("--batch", type=int, default=4, help="layer-wise row: batch of 1024-token sequences")
    p.add_argument("--layerwise-steps", type=int, default=4)
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="layer-wise row: deterministic kernels, so that equal math gives equal bits")
    p.add_argument("--skip-layerwise", action="store_true")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--layerwise-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layerwise_worker:
        Path(args.result).write_text(json.dumps(layerwise_worker(args)))
        return 0

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "engines": [], "notes": []}
    target = Path(os.environ.get("OUT") or WORK)
    target.mkdir(parents=True, exist_ok=True)

    def save():
        (target / "gpu_engines.json").write_text(json.dumps(out, indent=1))

    has_ds = _deepspeed_imports()
    for engine in [e for e in args.engines.split(",") if e]:
        if engine.startswith("zero") and not has_ds:
            out["notes"].append(f"{engine}: skipped, deepspeed does not import")
            continue
        row = engine_row(engine, args)
        _final_losses(row, WORK / engine)
        out["engines"].append(row)
        print(json.dumps(row), flush=True)
        save()
    ref = next((r.get("last_logged_loss") for r in out["engines"] if r["engine"] == "single"), None)
    for row in out["engines"]:
        if ref is not None and row.get("last_logged_loss") is not None:
            row["loss_minus_single"] = row["last_logged_loss"] - ref
    if not args.skip_layerwise:
        out["layerwise"] = layerwise_row(args)
        print(json.dumps(out["layerwise"]), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
