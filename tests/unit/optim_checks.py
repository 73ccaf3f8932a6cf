"""Checks shared by the per-algorithm unit tests: walking the matrices an optimizer steps, the
state-size formulas, and the "training lowers the loss" and "bad input is refused" patterns."""

from __future__ import annotations

import pytest
import torch
from helpers import set_grads, tiny_model, train

import distopt
from distopt.core import projector, subspace


@pytest.fixture
def one_thread():
    """These matrices are tiny: one thread avoids OpenMP overhead that dominates on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matrices(opt) -> list[tuple]:
    """``(param, state, group, view)`` for every parameter of the optimizer's matrix groups."""
    return [(p, opt.state[p], group, opt._views[p]) for group in opt.param_groups if group["kind"] == "matrix"
            for p in group["params"]]


def matrix_group(opt) -> dict:
    return next(g for g in opt.param_groups if g["kind"] == "matrix")


def step_with_grads(model, opt, seed: int):
    """One step on seeded gradients; returns the gradients and the parameters from before it."""
    set_grads(list(model.parameters()), seed)
    grads = {p: p.grad.clone() for p in model.parameters()}
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.step()
    return grads, before


def state_bytes_formula(opt, matrix_bytes) -> int:
    """Expected state bytes: ``4 + 8 N`` per element-wise AdamW parameter, ``matrix_bytes(opt, p, group)``
    per matrix."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += 4 + 8 * p.numel() if group["kind"] == "adamw" else matrix_bytes(opt, p, group)
    return total


def projected_adam_bytes(opt, p, group) -> int:
    """A projected-Adam matrix: ``step`` + ``basis`` (d x r) + two ``r x D`` moments (+ ``rs_norm``)."""
    m, n = p.shape
    plan = subspace.plan(opt._views[p], group)
    if plan.full:
        return 8 + 8 * m * n
    d = projector.side_dim(plan.side, (m, n))
    return 8 + 4 * (d * plan.rank + 2 * plan.rank * (m * n // d)) + (4 if group["recovery_scaling"] else 0)


def assert_state_bytes_match(opt, model, matrix_bytes, steps: int = 4) -> None:
    """Allocated state has its final size before the first step, and it is the formula's."""
    opt.allocate_state()
    before = distopt.state_bytes(opt)
    train(model, opt, steps)
    assert distopt.state_bytes(opt) == before == state_bytes_formula(opt, matrix_bytes)


def assert_lowers_the_loss(name: str, factor: float = 0.8, steps: int = 50, **hparams) -> None:
    model = tiny_model()
    opt = distopt.build_optimizer(model, name, **hparams)
    losses = train(model, opt, steps)
    assert losses[-1] < factor * losses[0]


def assert_refused(name: str, kwargs: dict, match: str, model=None) -> None:
    with pytest.raises(ValueError, match=match):
        distopt.build_optimizer(tiny_model() if model is None else model, name, **kwargs)
