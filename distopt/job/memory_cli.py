"""``distopt memory``: per-rank memory of model x optimizer x engine x world size x precision.

The formulas live in :mod:`distopt.memory`; this module builds the models on the meta device,
asks it for every combination and prints the table and the verdict.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

import distopt
from distopt import memory
from distopt.job.config import ConfigError
from distopt.job.modeling import build_model, load_shape, resolve_impl

GIB = 1024**3


def parse_optimizer_specs(specs: list[str]) -> list[tuple[str, str, dict]]:
    """``galore:rank=1024,update_proj_gap=500`` -> (label, name, hparams). Values are YAML scalars."""
    import yaml

    out, problems = [], []
    for spec in specs:
        for item in _split_specs(spec):
            name, _, rest = item.partition(":")
            hparams = {}
            for pair in filter(None, rest.split(",")):
                if "=" not in pair:
                    problems.append(f"{item!r}: hyper-parameters are key=value, separated by commas")
                    continue
                k, v = pair.split("=", 1)
                hparams[k.strip()] = yaml.safe_load(v)
            if name not in distopt.list_optimizers():
                problems.append(f"optimizer {name!r}: must be one of {', '.join(distopt.list_optimizers())}")
            label = name if not hparams else f"{name}({', '.join(f'{k}={v}' for k, v in hparams.items())})"
            out.append((label, name, hparams))
    if problems:
        raise ConfigError(problems)
    return out


def _split_specs(text: str) -> list[str]:
    """Split ``adamw galore:rank=8,scale=1`` or ``adamw,galore:rank=8`` into optimizer specs."""
    items, current = [], ""
    for token in text.replace(" ", ",").split(","):
        if not token:
            continue
        if "=" in token and current:
            current += "," + token
        else:
            if current:
                items.append(current)
            current = token
    if current:
        items.append(current)
    return items


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.replace(" ", ",").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distopt memory",
        description="Per-rank memory of model states (weights, gradients, optimizer state, projectors) for "
                    "each optimizer, engine, world size and precision; activations are not included.",
    )
    p.add_argument("--model", default="7b", help="configs/models/llama_<name>.yaml or a YAML path (default 7b)")
    p.add_argument("--optimizers", nargs="+", default=None,
                   help="optimizers, with hyper-parameters as name:key=value,... or 'all' (default: adamw galore); "
                        "a rank not given is the GaLore paper's for the model size (7b: 1024)")
    p.add_argument("--engines", default="ddp,fsdp2,zero1,zero2,zero3", help="comma-separated (default: %(default)s)")
    p.add_argument("--world", default="1,8", help="world sizes, comma-separated (default: %(default)s); "
                   "sharded engines are shown for sizes above 1")
    p.add_argument("--precision", default="bf16-mixed,bf16", help="fp32, bf16-mixed, bf16 (default: %(default)s)")
    p.add_argument("--hsdp-replicas", type=int, default=0, help="replica groups for hsdp (default: 2 when the size divides)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one accelerator in GiB (default 80)")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction kept free for activations and buffers (default 0.1)")
    p.add_argument("--impl", default="auto", choices=("auto", "hf", "native"))
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


# Subspace ranks the GaLore paper used for each LLaMA size (Zhao et al., 2024, Tables 2 and 5).
PAPER_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def _takes_rank(name: str) -> bool:
    from distopt.optim import REGISTRY

    return "rank" in inspect.signature(REGISTRY[name].__init__).parameters


def expand_specs(requested: list[str] | None, model_name: str) -> tuple[list[str], int | None]:
    """The optimizer specs to show; optimizers with a ``rank`` get the paper's rank for this model
    size unless one is given. Returns (specs, rank applied)."""
    key = Path(model_name).stem.replace("llama_", "")
    rank = PAPER_RANK.get(key)
    names = requested or ["adamw", "galore"]
    if names == ["all"]:
        names = distopt.list_optimizers()
    specs = []
    for spec in names:
        for item in _split_specs(spec):
            name = item.partition(":")[0]
            if rank and name in distopt.list_optimizers() and _takes_rank(name) and "rank=" not in item:
                item = f"{item}{',' if ':' in item else ':'}rank={rank}"
            specs.append(item)
    return specs, rank


def run(args) -> dict:
    shape = load_shape(args.model)
    impl = resolve_impl(args.impl)
    spec_list, paper_rank = expand_specs(args.optimizers, args.model)
    specs = parse_optimizer_specs(spec_list)
    engines = _csv(args.engines)
    worlds = _csv(args.world, int)
    precisions = _csv(args.precision)
    problems = [f"--engines: {e!r} is not one of {', '.join(memory.ENGINES)}" for e in engines if e not in memory.ENGINES]
    problems += [f"--precision: {x!r} is not one of {', '.join(memory.PRECISIONS)}" for x in precisions if x not in memory.PRECISIONS]
    problems += [f"--world: {w} must be >= 1" for w in worlds if w < 1]
    if not 0 <= args.reserve < 1:
        problems.append(f"--reserve={args.reserve}: must be in [0, 1)")
    if problems:
        raise ConfigError(problems)
    with torch.device("meta"):
        model = build_model(shape, impl)
    rows = []
    layouts = {}
    unavailable: set[str] = set()
    for label, name, hparams in specs:
        try:
            layouts[(label, 1, "fsdp2")] = memory.state_layout(model, name, hparams)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"optimizer {label}: {err}") from None
        for world in worlds:
            for engine in engines:
                if world == 1 and engine not in ("ddp", "single"):
                    continue
                if world > 1 and engine == "single":
                    continue
                if not memory.supported(name, engine):
                    unavailable.add(f"{label} under {engine}: not available (use fsdp2, hsdp or ddp)")
                    continue
                replicas = args.hsdp_replicas or (2 if world % 2 == 0 and world > 2 else 1)
                shard = world // replicas if engine == "hsdp" else world
                cut = engine if engine.startswith("zero") else "fsdp2"
                key = (label, shard if engine not in ("ddp", "single") else 1, cut)
                if key not in layouts:
                    layouts[key] = memory.state_layout(model, name, hparams, shard_ranks=key[1], engine=engine)
                for precision in precisions:
                    if engine.startswith("zero") and precision == "bf16" and "bf16-mixed" in precisions:
                        continue  # DeepSpeed keeps an fp32 master either way: the same numbers
                    b = memory.estimate(model, name, engine, world, precision, hparams=hparams,
                                        hsdp_replicas=replicas, layout=layouts[key])
                    adamw_key = ("adamw", key[1], cut)
                    if adamw_key not in layouts:
                        layouts[adamw_key] = memory.state_layout(model, "adamw", shard_ranks=key[1], engine=engine)
                    adamw = memory.estimate(model, "adamw", engine, world, precision, hsdp_replicas=replicas,
                                            layout=layouts[adamw_key])
                    one = sum(s.total for s in layouts[(label, 1, "fsdp2")])
                    rows.append({
                        "world": world, "engine": engine, "optimizer": label, "precision": precision,
                        "weights": b.weights, "gradients": b.gradients, "optimizer_state": b.optimizer_state,
                        "projectors": b.projectors, "total": b.total, "adamw_total": adamw.total,
                        # state + projectors per rank against one process's total over the ranks sharing it
                        "state_vs_ideal": (b.optimizer_state + b.projectors) / (one / key[1]) if one else 1.0,
                        "fits": b.fits(args.gpu_gib * GIB, args.reserve), "notes": b.notes,
                    })
    total_params = sum(p.numel() for p in model.parameters())
    largest = memory.largest_unit_params(model)
    reference = {
        f"{e}@{w}": memory.deepspeed_reference(e, total_params, w, largest)
        for w in worlds if w > 1 for e in engines if e.startswith("zero")
    }
    return {"model": args.model, "paper_rank": paper_rank, "num_params": total_params, "largest_unit_params": largest,
            "rows": rows, "unavailable": sorted(unavailable),
            "deepspeed_adamw_reference": reference, "gpu_gib": args.gpu_gib, "reserve": args.reserve}


def render(result: dict) -> str:
    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    width = max([22] + [len(r["optimizer"]) for r in result["rows"]])
    lines = [
        f"LLaMA {result['model']}: {result['num_params'] / 1e9:.2f}B parameters "
        f"(largest FSDP unit {result['largest_unit_params'] / 1e6:.0f}M). Model states per rank in GiB; "
        "activations not included."
        + (f" Optimizers with a rank use {result['paper_rank']}, the GaLore paper's for this size, unless given."
           if result.get("paper_rank") else ""),
        "",
        f"{'world':>5}  {'engine':<6}  {'precision':<10}  {'optimizer':<{width}} {'weights':>8} {'grads':>8} "
        f"{'state':>8} {'proj':>8} {'total':>8} {'xAdamW':>7} {'xideal':>7}  fits {result['gpu_gib']:g} GiB",
    ]
    last = None
    for r in result["rows"]:
        key = (r["world"], r["engine"])
        if last is not None and key != last:
            lines.append("")
        last = key
        lines.append(
            f"{r['world']:>5}  {r['engine']:<6}  {r['precision']:<10}  {r['optimizer']:<{width}} {gib(r['weights'])} "
            f"{gib(r['gradients'])} {gib(r['optimizer_state'])} {gib(r['projectors'])} {gib(r['total'])} "
            f"{r['total'] / r['adamw_total']:7.2f} {r['state_vs_ideal']:7.2f}  {'yes' if r['fits'] else 'no'}"
        )
    lines += ["", "xAdamW: total against AdamW's on the same engine, ranks and precision. xideal: state + proj per rank "
              "against one process's state + proj divided by the ranks sharing it (1.00 = split perfectly)."]
    ref = result["deepspeed_adamw_reference"]
    if ref:
        lines += ["", "DeepSpeed's own estimate for AdamW (estimate_zero2/3_model_states_mem_needs, no offload), GiB per rank: "
                  + ", ".join(f"{k} {v / GIB:.2f}" for k, v in ref.items())]
    lines += ["", f"What fits (model states within {100 * (1 - result['reserve']):.0f}% of {result['gpu_gib']:g} GiB per rank):"]
    for world in sorted({r["world"] for r in result["rows"]}):
        ok = [r for r in result["rows"] if r["world"] == world and r["fits"]]
        if ok:
            best = sorted(ok, key=lambda r: r["total"])
            names = "; ".join(f"{r['engine']}+{r['optimizer']} ({r['precision']}, {r['total'] / GIB:.1f})" for r in best[:8])
            more = f" and {len(best) - 8} more" if len(best) > 8 else ""
            lines.append(f"  {world} x {result['gpu_gib']:g} GiB: {names}{more}")
        else:
            lines.append(f"  {world} x {result['gpu_gib']:g} GiB: nothing in this table fits")
        no = [r for r in result["rows"] if r["world"] == world and not r["fits"]]
        if no and ok:
            lines.append("      does not fit: " + "; ".join(
                f"{r['engine']}+{r['optimizer']} ({r['precision']}, {r['total'] / GIB:.1f})" for r in no))
    notes = sorted({n for r in result["rows"] for n in r["notes"]}) + result.get("unavailable", [])
    if notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ConfigError as err:
        print(f"distopt memory: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
