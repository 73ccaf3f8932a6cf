"""The optimizer table: for every optimizer, the settings of the behaviours all of them share (the
matrix group alone trains, state bytes equal a formula, a resumed run is bit-identical, bad
hyper-parameters are refused with the key in the message), in the way of torch's ``OptimizerInfo``.
``test_optimizer_table.py`` runs the shared tests over it; each ``test_<algorithm>.py`` keeps only
what is particular to its algorithm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from helpers import tiny_model
from optim_checks import assert_constant_gradient_step, projected_adam_bytes

from distopt.models import LlamaShape, TinyLlama

# Grouped-query attention, so that q and k have different head counts (Adam-mini's blocks).
GQA = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)


def gqa_model():
    torch.manual_seed(0)
    return TinyLlama(GQA)


# -- state bytes of one matrix, ``(opt, p, group) -> int`` (element-wise AdamW: ``4 + 8 N``) --------
def adam_mini_bytes(opt, p, group):
    m, n = p.shape
    count = {"q": group["n_heads"], "k": group["n_kv_heads"]}.get(opt.param_role(p), m)
    return 8 + 4 * (m * n + count)


def _lowrank_rank(group, m, n):
    return min(group["rank"] if group["rank"] is not None else max(1, math.floor(group["rank_fraction"] * m * n / (m + n))), m, n)


def adapm_bytes(opt, p, group):
    m, n = p.shape
    role = opt.param_role(p)
    if role in ("q", "k", "mlp_in", "mlp_out"):
        return 8 + 4 * (_lowrank_rank(group, m, n) * (m + n) + m * n)
    if role in ("embedding", "o"):
        return 8 + 4 * m * n
    return 8 + 8 * m * n


def adapm_mini_bytes(opt, p, group):
    m, n = p.shape
    role = opt.param_role(p)
    blocks = {"q": group["n_heads"], "k": group["n_kv_heads"]}.get(role, m)
    if role in ("q", "k", "mlp_in", "mlp_out"):
        return 8 + 4 * (_lowrank_rank(group, m, n) * (m + n) + blocks)
    if role in ("embedding", "o"):
        return 8 + 4 * blocks
    return 8 + 4 * (m * n + blocks)


def rso_bytes(opt, p, group):
    layer = opt.owner(opt.param_name(p))
    r = min(group["rank"], layer.in_features)
    return 8 + 4 * (2 * r * layer.out_features + layer.in_features * r)


def sam_bytes(opt, p, group):
    m, n = p.shape
    k = min(group["rank"] or max(1, min(5, m // 10)), m, n)
    return 8 + 8 * m * n if k >= m else 8 + 4 * (m * k + k * n + m * n)


def snsm_bytes(opt, p, group):
    m, n = p.shape
    side = group["side"] if group["side"] != "auto" else ("right" if m >= n else "left")
    d = n if side == "right" else m
    other = m * n // d
    if group["rank"] >= d:
        return 8 + 4 * (m * n + max(m, n))
    r = min(group["rank"], m, n)
    return 8 + 4 * (d * r + r * other + max(m, n))


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    trains: tuple[dict, ...]  # hyper-parameters of "the matrix group alone lowers the loss" runs
    state_bytes: tuple[dict, ...]  # hyper-parameters of the state-bytes runs, checked against bytes_formula
    bytes_formula: Callable
    bytes_model: Callable = tiny_model
    bytes_steps: int = 4
    resume: tuple[dict, ...] = ()  # hyper-parameters of the bit-identical resume runs
    bad_inputs: tuple[tuple[dict, str], ...] = field(default=())  # (hyper-parameters, part of the message)
    # Checks of the algorithm's defining property that the table can state; the others are in its test file.
    defining: tuple[Callable[[], None], ...] = ()


def closed_form(name: str, **hparams) -> tuple[Callable[[], None], ...]:
    """A constant gradient gives projected Adam's closed-form step, on a right and on a left basis."""
    return tuple(partial(assert_constant_gradient_step, name, shape, **hparams) for shape in ((24, 18), (18, 24)))


RANK_RS = ((8, True), (8, False), (1000, True))  # rank and recovery scaling of the projected-Adam family

OPTIMIZERS = (
    OptimizerInfo(
        "adam-mini", trains=(dict(lr=1e-2),), state_bytes=(dict(),), bytes_formula=adam_mini_bytes, bytes_model=gqa_model,
        bytes_steps=2, resume=tuple(dict(lr=1e-2, weight_decay=0.01, adam_form=form) for form in ("torch", "hf")),
        bad_inputs=(
        (dict(n_heads=0), "n_heads=0"),
        (dict(n_heads=2.5), "n_heads=2.5"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(adam_form="keras"), "adam_form"),
        ),
    ),
    OptimizerInfo(
        "adapm", trains=(dict(lr=1e-2, update_proj_gap=10, correction="derived"),
                         dict(lr=1e-2, update_proj_gap=10, correction="none", fit_sweeps=0)),
        state_bytes=(dict(update_proj_gap=3), dict(update_proj_gap=3, rank=5), dict(update_proj_gap=3, rank_fraction=0.3)),
        bytes_formula=adapm_bytes,
        resume=tuple(dict(lr=1e-2, rank=3, update_proj_gap=3, correction=c) for c in ("derived", "literal")),
        bad_inputs=(
        (dict(rank_fraction=0.0), "rank_fraction=0.0"),
        (dict(rank_fraction=1.5), "rank_fraction=1.5"),
        (dict(rank=0), "rank=0"),
        (dict(rank=1.5), "rank=1.5"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(fit_sweeps=-1), "fit_sweeps=-1"),
        (dict(fit_sweeps=1000), "fit_sweeps=1000"),
        (dict(correction="paper"), "correction='paper'"),
        (dict(clip=0.0), "clip=0.0"),
        (dict(clip=float("inf")), "clip=inf"),
        (dict(bias_correction="yes"), "bias_correction='yes'"),
        (dict(oversample=-1), "oversample=-1"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(lr=-1.0), "lr=-1.0"),
        ),
    ),
    OptimizerInfo(
        "adapm-mini", trains=(dict(lr=1e-2, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3) for rank in (None, 4)), bytes_formula=adapm_mini_bytes,
        bytes_model=gqa_model, resume=(dict(lr=1e-2, rank=3, update_proj_gap=3),),
        bad_inputs=(
        (dict(n_heads=-1), "n_heads=-1"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (dict(n_heads=5), "not divisible into 5 head blocks"),
        (dict(correction="signed"), "correction='signed'"),
        (dict(rank_fraction=2.0), "rank_fraction=2.0"),
        (dict(clip=-1.0), "clip=-1.0"),
        ),
    ),
    OptimizerInfo(
        "galore", trains=tuple(dict(lr=3e-2, rank=8, update_proj_gap=10, side=side) for side in ("auto", "longer")),
        state_bytes=tuple(dict(rank=rank, side=side, update_proj_gap=3, basis_dtype=dtype) for rank, side, dtype in (
            (8, "auto", "fp32"), (8, "left", "fp32"), (8, "right", "fp32"), (8, "longer", "fp32"), (8, "auto", "bf16"),
            (1000, "auto", "fp32"))),
        bytes_formula=projected_adam_bytes, bytes_steps=5, defining=closed_form("galore"),
        resume=tuple(dict(lr=1e-2, rank=6, update_proj_gap=3, refresh=refresh, moment_policy=policy, basis_dtype=dtype)
                     for refresh, policy, dtype in (("randomized", "keep", "fp32"), ("svd", "rotate", "fp32"),
                                                    ("random", "transform", "fp32"), ("randomized", "rotate", "bf16"))),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(rank=-3), "rank=-3"),
        (dict(rank=2.5), "rank=2.5"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(lr=float("inf")), "lr=inf"),
        (dict(lr=1e39), "largest float32"),
        (dict(scale=-1), "scale=-1"),
        (dict(scale=0), "scale=0"),
        (dict(elementwise={"lrr": 1e-3}), "unknown keys"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(update_proj_gap=0), "update_proj_gap"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(side="up"), "side='up'"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(moment_policy="spin"), "moment_policy"),
        (dict(adam_form="keras"), "adam_form"),
        (dict(basis_dtype="fp16"), "basis_dtype='fp16'"),
        ),
    ),
    OptimizerInfo(
        "golore", trains=(dict(lr=3e-2, rank=8, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3, recovery_scaling=rs) for rank, rs in ((8, False), (8, True), (1000, True))),
        bytes_formula=projected_adam_bytes, resume=(dict(lr=1e-2, rank=6, update_proj_gap=3, recovery_scaling=True),),
        defining=closed_form("golore"),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(galore_steps=-1), "galore_steps=-1"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(moment_policy="spin"), "moment_policy='spin'"),
        (dict(scale=float("nan")), "scale=nan"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit=0.5"),
        (dict(recovery_scaling="yes"), "recovery_scaling='yes'"),
        ),
    ),
    OptimizerInfo(
        "grassjump", trains=(dict(lr=3e-2, rank=8, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3, recovery_scaling=rs) for rank, rs in RANK_RS),
        bytes_formula=projected_adam_bytes, resume=(dict(lr=1e-2, rank=6, update_proj_gap=3),),
        defining=closed_form("grassjump", recovery_scaling=False),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(update_proj_gap=-2), "update_proj_gap=-2"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(moment_policy="spin"), "moment_policy='spin'"),
        (dict(norm_growth_limit=float("nan")), "norm_growth_limit=nan"),
        (dict(norm_growth_limit=0.99), "norm_growth_limit=0.99"),
        (dict(recovery_scaling=1), "recovery_scaling=1"),
        (dict(scale=math.inf), "scale=inf"),
        (dict(side="up"), "side='up'"),
        ),
    ),
    OptimizerInfo(
        "grasswalk", trains=(dict(lr=3e-2, rank=8, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3, recovery_scaling=rs) for rank, rs in RANK_RS),
        bytes_formula=projected_adam_bytes, resume=(dict(lr=1e-2, rank=6, update_proj_gap=3),),
        defining=closed_form("grasswalk", recovery_scaling=False),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(walk_angle=0.0), "walk_angle=0.0"),
        (dict(walk_angle=2.0), "walk_angle=2.0"),
        (dict(walk_angle=float("nan")), "walk_angle=nan"),
        (dict(tangent_rank=0), "tangent_rank=0"),
        (dict(tangent_rank=1.5), "tangent_rank=1.5"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit=0.5"),
        (dict(moment_policy="spin"), "moment_policy='spin'"),
        ),
    ),
    # RSO's resume (across layouts) and refusals (the model left unchanged) are in test_rso.py.
    OptimizerInfo(
        "rso", trains=(dict(lr=3e-3, rank=8, update_proj_gap=10),),
        state_bytes=(dict(rank=4, update_proj_gap=2), dict(rank=1000, update_proj_gap=2)), bytes_formula=rso_bytes,
        bytes_steps=3,
    ),
    OptimizerInfo(
        "sam", trains=(dict(lr=1e-2, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3) for rank in (None, 3, 1000)), bytes_formula=sam_bytes,
        resume=tuple(dict(lr=1e-2, update_proj_gap=3, refresh=refresh, moment_policy=policy)
                     for refresh, policy in (("randomized", "rotate"), ("svd", "keep"), ("random", "reset"))),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(rank=2.5), "rank=2.5"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(moment_policy="transform"), "moment_policy='transform'"),
        (dict(stagger=1), "stagger=1"),
        (dict(eps_inside_sqrt=None), "eps_inside_sqrt=None"),
        (dict(power_iters=-1), "power_iters=-1"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(lr=float("inf")), "lr=inf"),
        ),
    ),
    OptimizerInfo(
        "snsm", trains=(dict(lr=1e-2, rank=8, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, side=side, update_proj_gap=3) for rank, side in [(8, "auto"), (8, "left"), (8, "right"), (1000, "auto")]),
        bytes_formula=snsm_bytes,
        resume=tuple(dict(lr=1e-2, rank=6, update_proj_gap=3, refresh=refresh, moment_policy=policy)
                     for refresh, policy in (("randomized", "reset"), ("svd", "keep"))),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(rank=2.5), "rank=2.5"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(side="up"), "side='up'"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(moment_policy="transform"), "moment_policy='transform'"),
        (dict(stagger="yes"), "stagger='yes'"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(eps=-1e-8), "eps"),
        ),
    ),
    OptimizerInfo(
        "subtrack", trains=(dict(lr=3e-2, rank=8, update_proj_gap=10),),
        state_bytes=tuple(dict(rank=rank, update_proj_gap=3, recovery_scaling=rs) for rank, rs in RANK_RS),
        bytes_formula=projected_adam_bytes, resume=(dict(lr=1e-2, rank=6, update_proj_gap=3),),
        defining=closed_form("subtrack", recovery_scaling=False),
        bad_inputs=(
        (dict(rank=0), "rank=0"),
        (dict(step_size=0.0), "step_size=0.0"),
        (dict(step_size=float("inf")), "step_size=inf"),
        (dict(max_angle=2.0), "max_angle=2.0"),
        (dict(refresh="qr"), "refresh='qr'"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(norm_growth_limit=-1.0), "norm_growth_limit=-1.0"),
        ),
    ),
)
