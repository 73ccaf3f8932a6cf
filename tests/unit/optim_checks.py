"""Checks shared by the per-algorithm unit tests: walking the matrices an optimizer steps, the
state-size formulas, and the "training lowers the loss" and "bad input is refused" patterns."""

from __future__ import annotations

import math

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
    basis_bytes = 2 if group.get("basis_dtype") == "bf16" else 4
    return 8 + basis_bytes * d * plan.rank + 4 * 2 * plan.rank * (m * n // d) + (4 if group["recovery_scaling"] else 0)


def assert_state_bytes_match(opt, model, matrix_bytes, steps: int = 4) -> None:
    """Allocated state has its final size before the first step, and it is the formula's."""
    opt.allocate_state()
    before = distopt.state_bytes(opt)
    train(model, opt, steps)
    assert distopt.state_bytes(opt) == before == state_bytes_formula(opt, matrix_bytes)


def assert_matrix_group_trains(name: str, margin: float = 0.95, steps: int = 60, **hparams) -> None:
    """The algorithm's own update trains: with the element-wise AdamW group frozen (lr 0), the
    matrix group alone ends with a loss below ``margin`` times that of a run with every group
    frozen. (Any update of the element-wise group alone would pass a plain "loss went down" check.)"""
    finals = []
    for lr in (hparams["lr"], 0.0):
        model = tiny_model()
        opt = distopt.build_optimizer(model, name, elementwise={"lr": 0.0}, **{**hparams, "lr": lr})
        losses = train(model, opt, steps)
        assert all(math.isfinite(x) for x in losses), (name, losses)
        finals.append(sum(losses[-4:]) / 4)
    trained, frozen = finals
    assert trained < margin * frozen, f"{name}: matrix group alone {trained:.4f} vs all frozen {frozen:.4f}"


def assert_refused(name: str, kwargs: dict, match: str, model=None) -> None:
    with pytest.raises(ValueError, match=match):
        distopt.build_optimizer(tiny_model() if model is None else model, name, **kwargs)


def one_matrix_optimizer(name: str, w: torch.Tensor, role: str = "q", **hparams):
    """``name``'s optimizer over one matrix ``w`` with role ``role``."""
    from distopt.optim import REGISTRY

    return REGISTRY[name]([{"params": [w], "param_names": [f"layer.{role}_proj.weight"], "kind": "matrix", "roles": [role]}],
                          **hparams)


def update_norms(opt, w: torch.Tensor, grads) -> list[float]:
    """``||W_after - W_before||`` of each step of ``opt`` on the gradients ``grads``, in turn."""
    norms = []
    for grad in grads:
        w.grad = grad.clone()
        before = w.detach().clone()
        opt.step()
        norms.append((w.detach() - before).norm().item())
    return norms


def assert_constant_gradient_step(name: str, shape: tuple[int, int], steps: int = 4, lr: float = 1e-3, wd: float = 0.1,
                                  scale: float = 0.25, **hparams) -> None:
    """Projected Adam, closed form: a constant gradient ``G`` gives bias-corrected moments ``R`` and
    ``R^2`` (``R`` = ``G`` projected), so until the basis changes every step is
    ``W <- W (1 - lr wd) - lr scale back(sign(R))``. It pins the step size, the bias corrections, the
    weight decay and the scale, independently of the code's own formulas."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g)
    w0 = torch.randn(shape, generator=g)
    w = torch.nn.Parameter(w0.clone())
    opt = one_matrix_optimizer(name, w, lr=lr, weight_decay=wd, scale=scale, eps=1e-12, rank=4, update_proj_gap=1000,
                               **hparams)
    side = subspace.plan(opt._views[w], opt.param_groups[0]).side
    expected = w0.clone()
    for step in range(steps):
        w.grad = grad.clone()
        opt.step()
        basis = opt.state[w]["basis"]
        back = basis @ (basis.T @ grad).sign() if side == "left" else (grad @ basis).sign() @ basis.T
        expected = expected * (1 - lr * wd) - lr * scale * back
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-7, msg=lambda m, step=step: f"{name} step {step}: {m}")


def assert_routed_matrices_step_as_per_matrix(cls, name: str, monkeypatch, **hparams) -> None:
    """Matrices that ``cls``'s batched routing leaves to the per-matrix step (``hparams`` make them
    so) are stepped: every matrix moves, exactly as the plain per-matrix loop moves it."""
    from distopt.optim.base import SubspaceOptimizer

    runs = []
    for routed in (True, False):
        if not routed:
            monkeypatch.setattr(cls, "_step_matrices", SubspaceOptimizer._step_matrices)
        model = tiny_model()
        opt = distopt.build_optimizer(model, name, lr=1e-2, **hparams)
        before = [p.detach().clone() for p in matrix_group(opt)["params"]]
        train(model, opt, 2)
        assert all(not torch.equal(b, p) for b, p in zip(before, matrix_group(opt)["params"]))
        runs.append(model)
    for x, y in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(x, y)


def assert_batched_step_equals_per_matrix(cls, name: str, monkeypatch, fixed_grads: bool = False, **hparams) -> None:
    """``cls``'s same-shape matrices stepped as one batch (``cls._step_batch``): over 7 steps (gap 3,
    so refreshes and momentum resets fall inside), the weights and every state tensor of the
    per-matrix step, up to the rounding of the batched products; the batch path really took the
    matrices. ``fixed_grads``: the same random gradients both ways instead of training, for an
    update that magnifies rounding (a ratio over an element-wise second moment)."""
    from distopt.optim.base import SubspaceOptimizer

    batched_calls = []
    real = cls._step_batch
    monkeypatch.setattr(cls, "_step_batch", lambda self, g, ps: (batched_calls.append(len(ps)), real(self, g, ps))[1])
    models, opts = {}, {}
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(cls, "_step_matrices", SubspaceOptimizer._step_matrices)
        models[batched] = tiny_model()
        opts[batched] = distopt.build_optimizer(models[batched], name, lr=1e-2, update_proj_gap=3, **hparams)
        if fixed_grads:
            for step in range(7):
                set_grads(models[batched].parameters(), seed=step)
                opts[batched].step()
        else:
            train(models[batched], opts[batched], 7)
    assert sum(batched_calls) == 7 * len(matrix_group(opts[True])["params"]) and max(batched_calls) > 1
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key, value in opts[True].state[a].items():
            torch.testing.assert_close(value, opts[False].state[b][key], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
