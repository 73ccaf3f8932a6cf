"""The GPU benchmark suite: every optimizer side by side on one GPU, in one process.

Sections (``--sections``, comma-separated; all by default):

- ``step``: the optimizer step alone on LLaMA-1B parameters with fixed random gradients, over one
  first step and a full refresh cycle of ``--gap`` steps: amortized (mean) step, worst single step,
  first step and ``distopt.state_bytes``, for torch fused AdamW, galore-torch, adam-mini and our
  ``galore``, ``adapm-mini``, ``grassjump`` and ``subtrack`` (rank 512, gap 200).
- ``e2e``: a whole training step of ``transformers.LlamaForCausalLM``-1B, batch 8 x 1024, bf16
  autocast, fp32 master weights: tokens/s and peak memory for AdamW and the flagship optimizers.
- ``maxbatch``: the largest batch that fits (doubling, then bisection; out-of-memory errors are
  caught and memory is freed between tries) and the tokens/s at that batch.
- ``7b``: LLaMA-7B on one GPU with bf16 weights, our low-rank states, activation checkpointing and
  the layer-wise mode (``distopt.engines.layerwise``), batch 1 x 2048; then AdamW at 7B, where an
  out-of-memory error is reported (with the bytes it tried to allocate) instead of raised.
- ``memory``: the ``distopt memory`` estimate against the measured peak of the 1B and 7B runs.

Results go to ``--out`` (JSON, rewritten after every section) and ``<out>.md`` (one markdown table
per section, plus the goals). The goals are printed against the H100 anchor measurements.

The script needs only torch with CUDA. A row whose comparison package (galore-torch, adam-mini) is
missing is skipped with a note; ``docs/benchmarks.md`` gives the command that installs them from
local wheels. The parts live in ``benchmarks/suite/``.

    python benchmarks/gpu_suite.py                                  # cuda, LLaMA-1B and 7B shapes
    python benchmarks/gpu_suite.py --sections step,e2e --gap 200
    python benchmarks/gpu_suite.py --device cpu --tiny              # the logic, on CPU, in seconds
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import environment, markdown_table, write_json
from suite.base import (  # noqa: E402
    ANCHORS,
    GIB,
    GOALS,
    PEER_ROWS,
    ROOT,
    RUNNING,
    SECTIONS,
    STEP_OPTIMIZERS,
    Config,
    check_labels,
    distopt_name,
    model_shapes,
    peer_versions,
)
from suite.report import brief, csv_list, format_measured, goals  # noqa: E402
from suite.step import section_step  # noqa: E402
from suite.training import section_7b, section_e2e, section_maxbatch, section_memory  # noqa: E402

import distopt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 2-3 steps, small batches: checks the logic")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {SECTIONS}")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gpu_suite.json"),
                   help="JSON path; the tables go beside it (.md)")
    p.add_argument("--rank", type=int, default=None, help="rank at 1B (default 512; tiny 8)")
    p.add_argument("--rank-7b", type=int, default=None, help="rank at 7B (default 1024, the GaLore paper's; tiny 16)")
    p.add_argument("--gap", type=int, default=None,
                   help="update_proj_gap = the measured refresh cycle (default 200; tiny 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-optimizers", default=",".join(STEP_OPTIMIZERS),
                   help="step section rows: adamw-fused, adamw-foreach, galore-torch, adam-mini, or a distopt optimizer "
                        "(distopt:adam-mini for ours)")
    p.add_argument("--flagship", default="galore,adapm-mini", help="our optimizers in the e2e section and the goals")
    p.add_argument("--maxbatch-optimizers", default="adamw-fused,galore")
    p.add_argument("--batch", type=int, default=None, help="e2e batch (default 8; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="e2e and max-batch sequence length (default 1024; tiny 32)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed steps after the first (default 10; tiny 2)")
    p.add_argument("--maxbatch-cap", type=int, default=None, help="largest batch tried (default 512; tiny 4)")
    p.add_argument("--maxbatch-try-steps", type=int, default=2, help="training steps per batch tried")
    p.add_argument("--optimizer-7b", default="galore", help="our optimizer at 7B (default galore)")
    p.add_argument("--adamw-7b", default="fused,layerwise",
                   help="AdamW rows at 7B: fused (fp32 master weights, autocast) and/or layerwise (bf16 weights, "
                        "layer-wise, checkpointing, like ours); empty for none")
    p.add_argument("--batch-7b", type=int, default=1)
    p.add_argument("--seq-7b", type=int, default=None, help="default 2048; tiny 64")
    p.add_argument("--steps-7b", type=int, default=None, help="timed steps after the first (default 4; tiny 2)")
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="cap this process's GPU memory at this many GiB where the GPU is larger (an H200 then stands "
                        "in for an 80 GB GPU); 0 for the whole GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own; 1 with --device cpu --tiny)")
    p.add_argument("--tf32-step", action="store_true", help="TF32 matmuls in the step section (off, as the anchors)")
    p.add_argument("--impl", default="auto", choices=("auto", "hf", "native"),
                   help="model for training sections: hf (LlamaForCausalLM), native (TinyLlama); auto = hf if installed")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu --tiny to check the logic)")
    sections = csv_list(args.sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    flagship, step_rows, max_rows = csv_list(args.flagship), csv_list(args.step_optimizers), csv_list(args.maxbatch_optimizers)
    bad = check_labels(step_rows + flagship + max_rows + [args.optimizer_7b])
    if bad:
        parser.error(f"unknown optimizers {bad}; use {PEER_ROWS} or one of {distopt.list_optimizers()}")
    if distopt_name(args.optimizer_7b) is None:
        parser.error("--optimizer-7b must be a distopt optimizer (the layer-wise mode needs one)")
    adamw_7b = csv_list(args.adamw_7b)
    if set(adamw_7b) - {"fused", "layerwise"}:
        parser.error("--adamw-7b takes fused and/or layerwise")

    notes: list[str] = []
    started = time.perf_counter()
    versions = peer_versions(notes)
    from distopt.job.modeling import resolve_impl

    impl = args.impl
    if impl == "hf" and versions["transformers"] is None:
        parser.error("--impl hf: transformers is not installed")
    impl = resolve_impl(impl)
    if impl == "native":
        notes.append("training sections use distopt.models.TinyLlama (same names and shapes), not LlamaForCausalLM")
    tiny = args.tiny
    one_b, seven_b = model_shapes(tiny)
    cfg = Config(
        device=args.device, tiny=tiny, shape_1b=one_b, shape_7b=seven_b,
        rank=args.rank or (8 if tiny else 512), rank_7b=args.rank_7b or (16 if tiny else 1024),
        gap=args.gap or (3 if tiny else 200), lr=args.lr, seed=args.seed,
        batch=args.batch or (2 if tiny else 8), seq=args.seq or (32 if tiny else 1024),
        e2e_steps=args.e2e_steps or (2 if tiny else 10), maxbatch_cap=args.maxbatch_cap or (4 if tiny else 512),
        maxbatch_try_steps=args.maxbatch_try_steps, batch_7b=args.batch_7b, seq_7b=args.seq_7b or (64 if tiny else 2048),
        steps_7b=args.steps_7b or (2 if tiny else 4), impl=impl, tf32_step=args.tf32_step,
    )
    threads = args.threads or (1 if tiny and not cuda else None)
    if threads:
        torch.set_num_threads(threads)
    env = environment(args.device)
    limit = None
    if cuda:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        limit = total
        if args.gpu_gib and total > args.gpu_gib * GIB:
            torch.cuda.set_per_process_memory_fraction(args.gpu_gib * GIB / total)
            limit = int(args.gpu_gib * GIB)
            notes.append(f"GPU memory capped at {args.gpu_gib:g} GiB of {total / GIB:.1f} GiB")
        env.update(gpu_total_bytes=total, memory_limit_bytes=limit)
    if not cuda:
        notes.append("CPU: peak memory is not measured (None); max_rss_bytes is the process's peak resident set")
    if tiny:
        notes.append("tiny shapes: checks the logic only; these figures are no evidence for the goals")

    # `timeout` stops with SIGTERM: raise it as SystemExit so the finished rows are saved.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out)
    payload = {"benchmark": "gpu_suite", "env": env, "peers": versions, "anchors_h100": ANCHORS, "goals_targets": GOALS,
               "settings": {"tiny": tiny, "rank": cfg.rank, "rank_7b": cfg.rank_7b, "gap": cfg.gap, "lr": cfg.lr,
                            "model": impl, "flagship": flagship, "sections": sections, "gpu_gib_cap": args.gpu_gib},
               "notes": notes, "sections": {}, "goals": []}
    markdown = [f"# GPU suite: {env['device_name']} | torch {env['torch']} | commit {env['commit']} | {env['date']}"
                + (" | CPU/tiny: not evidence for the goals" if tiny or not cuda else "")]

    def save():
        payload["elapsed_s"] = time.perf_counter() - started
        write_json(out, payload)
        out.with_suffix(".md").write_text("\n\n".join(markdown) + "\n")

    runners = {
        "step": lambda: section_step(cfg, step_rows),
        "e2e": lambda: section_e2e(cfg, ["adamw-fused", *flagship]),
        "maxbatch": lambda: section_maxbatch(cfg, max_rows),
        "7b": lambda: section_7b(cfg, args.optimizer_7b, adamw_7b),
        "memory": lambda: section_memory(cfg, flagship, args.optimizer_7b, adamw_7b),
    }
    for name in SECTIONS:  # always in this order: memory reuses the e2e and 7b runs
        if name not in sections:
            continue
        print(f"[{name}]", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        try:
            result = runners[name]()
        except (KeyboardInterrupt, SystemExit):  # keep what finished when stopped (Ctrl-C, `timeout`)
            done = [{k: v for k, v in r.items() if k != "tried"} for r in RUNNING["rows"]]
            payload["sections"][name] = {"rows": done, "stopped": True, "elapsed_s": time.perf_counter() - tic}
            notes.append(f"stopped during section {name}: {len(done)} row(s) finished, kept without ratios")
            lines = [f"- {r.get('optimizer') or r.get('run')}: {brief(r, 'mean_ms' if name == 'step' else 'tokens_per_s')}"
                     for r in done]
            markdown.append(f"## {name} (stopped: finished rows only)\n\n" + "\n".join(lines))
            save()
            raise
        result["elapsed_s"] = time.perf_counter() - tic
        payload["sections"][name] = result
        markdown.append(f"## {name}\n\n{result['markdown']}")
        print(f"\n## {name}\n\n{result['markdown']}\n", flush=True)
        save()

    payload["goals"] = goals(cfg, payload["sections"], flagship, args.optimizer_7b, limit)
    gtable = markdown_table(
        [{**g, "measured": format_measured(g["measured"]), "met": {True: "yes", False: "no", None: ""}[g["met"]],
          "anchor": g["anchor"] or ""} for g in payload["goals"]],
        [("goal", "goal", "s"), ("target", "target", "s"), ("measured", "measured", "s"), ("met", "met", "s"),
         ("anchor", "anchor", "s")])
    label = "goals" + ("" if cuda and not tiny else " (CPU/tiny: not evidence)")
    markdown.append(f"## {label}\n\n{gtable}")
    print(f"## {label}\n\n{gtable}\n")
    if notes:
        print("notes:\n" + "\n".join(f"  - {n}" for n in notes))
    save()
    print(f"JSON: {out}  tables: {out.with_suffix('.md')}  ({payload['elapsed_s']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
