"""AdamSNSM: subset-norm second moment, subspace momentum with reset, state, checkpoints, bad input."""

import pytest
import torch
from helpers import tiny_model, train
from optim_checks import (  # noqa: F401 (a fixture, used by name)
    assert_batched_step_equals_per_matrix,
    assert_matrix_group_trains,
    assert_refused,
    assert_routed_matrices_step_as_per_matrix,
    assert_state_bytes_match,
    matrix_group,
    one_matrix_optimizer,
    one_thread,
    step_with_grads,
)

import distopt
from distopt.core import projector, subspace

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_linear_is_a_matrix_and_embeddings_norms_use_adamw():
    opt = distopt.build_optimizer(tiny_model(), "snsm", rank=4)
    names = matrix_group(opt)["param_names"]
    assert "lm_head.weight" in names and "model.layers.0.self_attn.o_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert not any("embed" in n or "norm" in n for n in names)


def test_second_moment_is_a_sum_per_subset_along_the_shorter_side():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "snsm", rank=4, betas=(0.9, 0.99))
    grads, _ = step_with_grads(model, opt, seed=0)
    seen = set()
    for p in matrix_group(opt)["params"]:
        m, n = p.shape
        v = opt.state[p]["exp_avg_sq"]
        assert v.numel() == max(m, n)
        sq = grads[p].square()
        expected = sq.sum(dim=1, keepdim=True) if m >= n else sq.sum(dim=0, keepdim=True)  # sum, not mean
        assert v.shape == expected.shape
        torch.testing.assert_close(v, 0.01 * expected, rtol=1e-6, atol=0)
        seen.add("rows" if m >= n else "columns")
    assert seen == {"rows", "columns"}  # the tiny model has both orientations (down_proj is 48 x 80)


def _expected_step(opt, p, grad, since, step, lr, eps, betas):
    """The documented update, rebuilt from the state the step left behind."""
    group = matrix_group(opt)
    state = opt.state[p]
    plan = subspace.plan(opt._views[p], group)
    basis = state["basis"]
    low = projector.project(grad, basis, plan.side, None)
    back = lambda x: projector.project_back(x, basis, plan.side)  # noqa: E731
    u = back(state["exp_avg"] / (1 - betas[0] ** since)) + (grad - back(low))
    denom = (state["exp_avg_sq"] / (1 - betas[1] ** step)).sqrt() + eps
    return lr * u / denom, low


def test_momentum_resets_on_the_refresh_step_and_the_complement_gets_sgd():
    lr, eps, betas = 1e-2, 1e-8, (0.9, 0.999)
    model = tiny_model()
    opt = distopt.build_optimizer(model, "snsm", lr=lr, rank=4, update_proj_gap=3, stagger=False, eps=eps,
                                  betas=betas)
    for seed in range(3):  # steps 0, 1, 2; step 3 refreshes every matrix
        step_with_grads(model, opt, seed)
    matrices = matrix_group(opt)["params"]
    old_basis = {p: opt.state[p]["basis"].clone() for p in matrices}

    grads, before = step_with_grads(model, opt, seed=3)  # refresh step
    for p in matrices:
        assert not torch.equal(opt.state[p]["basis"], old_basis[p])
        delta, low = _expected_step(opt, p, grads[p], since=1, step=4, lr=lr, eps=eps, betas=betas)
        # Reset before the update: nothing of the old basis's momentum is left.
        torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - betas[0]) * low, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(before[p] - p.detach(), delta, rtol=1e-4, atol=1e-7)

    grads, before = step_with_grads(model, opt, seed=4)  # the step after: momentum is 2 steps old
    for p in matrices:
        plan = subspace.plan(opt._views[p], matrix_group(opt))
        delta, low = _expected_step(opt, p, grads[p], since=2, step=5, lr=lr, eps=eps, betas=betas)
        torch.testing.assert_close(before[p] - p.detach(), delta, rtol=1e-4, atol=1e-7)
        # Outside the subspace the numerator is the raw gradient (plain SGD), scaled only by 1/sqrt(v).
        basis = opt.state[p]["basis"]
        numerator = delta * ((opt.state[p]["exp_avg_sq"] / (1 - betas[1] ** 5)).sqrt() + eps) / lr
        outside = numerator - projector.project_back(projector.project(numerator, basis, plan.side, None),
                                                     basis, plan.side)
        complement = grads[p] - projector.project_back(low, basis, plan.side)
        torch.testing.assert_close(outside, complement, rtol=1e-3, atol=1e-5)


def test_full_rank_is_adam_with_subset_norm():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "snsm", rank=10_000, lr=1e-2, betas=(0.8, 0.9))
    train(model, opt, 2)
    grads, before = step_with_grads(model, opt, seed=5)
    for p in matrix_group(opt)["params"]:
        state = opt.state[p]
        assert "basis" not in state and state["exp_avg"].shape == p.shape
        expected = 1e-2 * (state["exp_avg"] / (1 - 0.8**3)) / ((state["exp_avg_sq"] / (1 - 0.9**3)).sqrt() + 1e-6)
        torch.testing.assert_close(before[p] - p.detach(), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("shape", [(24, 18), (18, 24)])  # subsets are rows, then columns
def test_constant_gradient_gives_the_closed_form_step(shape):
    # M / c1 = proj(G), so the numerator back(M / c1) + (G - back(proj G)) is G itself, and V / c2 is
    # each subset's sum of g^2: every step is W <- W (1 - lr wd) - lr G / (||G_subset|| + eps).
    g = torch.Generator().manual_seed(0)
    grad, w0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.nn.Parameter(w0.clone())
    lr, wd = 1e-2, 0.1
    opt = one_matrix_optimizer("snsm", w, lr=lr, weight_decay=wd, eps=1e-12, rank=4, update_proj_gap=3)
    norms = grad.norm(dim=1, keepdim=True) if shape[0] >= shape[1] else grad.norm(dim=0, keepdim=True)
    expected = w0.clone()
    for step in range(7):  # momentum resets at steps 3 and 6
        w.grad = grad.clone()
        opt.step()
        expected = expected * (1 - lr * wd) - lr * grad / norms
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-7, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("hparams", [{}, {"side": "left", "weight_decay": 0.1}, {"moment_policy": "keep", "stagger": False},
                                     {"moment_policy": "rotate", "refresh": "svd"}])
def test_batched_step_equals_the_per_matrix_step(hparams, monkeypatch):
    from distopt.optim.snsm import AdamSNSM

    assert_batched_step_equals_per_matrix(AdamSNSM, "snsm", monkeypatch, rank=6, **hparams)


@pytest.mark.parametrize("hparams", [{"adam_form": "hf"}, {"rank": 10_000}])
def test_matrices_left_to_the_per_matrix_step_are_stepped(hparams, monkeypatch):
    """The hf form and full rank take the per-matrix path inside the batched routing."""
    from distopt.optim.snsm import AdamSNSM

    assert_routed_matrices_step_as_per_matrix(AdamSNSM, "snsm", monkeypatch, update_proj_gap=3, **hparams)
