"""SAM: rank-k left-subspace momentum over a full second moment; state, checkpoints, bad input."""

import pytest
import torch
from helpers import set_grads, tiny_model, train
from optim_checks import (  # noqa: F401 (a fixture, used by name)
    assert_batched_step_equals_per_matrix,
    assert_matrix_group_trains,
    assert_refused,
    assert_routed_matrices_step_as_per_matrix,
    assert_state_bytes_match,
    matrix_group,
    one_matrix_optimizer,
    one_thread,
    update_norms,
)
from torch import nn

import distopt
from distopt.optim.sam import SAM, sam_rank

pytestmark = pytest.mark.usefixtures("one_thread")


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(30, 8, bias=False)  # m = 8 < 10: k = 1
        self.mlp.down_proj = nn.Linear(8, 70, bias=False)  # m = 70: k = 5


def test_rank_is_min_5_m_over_10_from_the_global_shape():
    assert [sam_rank((m, 100), None) for m in (3, 9, 10, 25, 48, 80, 4096)] == [1, 1, 1, 2, 4, 5, 5]
    assert sam_rank((4096, 3), None) == 3  # never more than min(m, n)
    assert sam_rank((48, 48), 7) == 7
    model = tiny_model()
    opt = distopt.build_optimizer(model, "sam")
    opt.allocate_state()
    for name, p in zip(matrix_group(opt)["param_names"], matrix_group(opt)["params"]):
        m, n = p.shape
        k = {48: 4, 80: 5}[m]
        state = opt.state[p]
        assert state["basis"].shape == (m, k), name
        assert state["exp_avg"].shape == (k, n) and state["exp_avg_sq"].shape == (m, n), name
    small = _Small()
    opt = distopt.build_optimizer(small, "sam")
    opt.allocate_state()
    assert opt.state[small.mlp.up_proj.weight]["basis"].shape == (8, 1)
    assert opt.state[small.mlp.down_proj.weight]["basis"].shape == (70, 5)


@pytest.mark.parametrize("inside", [True, False])
def test_numerator_is_rank_k_in_the_gradient_column_space(inside):
    model = tiny_model()
    lr, eps, betas = 1e-2, 1e-8, (0.9, 0.999)
    opt = distopt.build_optimizer(model, "sam", lr=lr, eps=eps, betas=betas, update_proj_gap=4, eps_inside_sqrt=inside)
    for seed in range(3):
        set_grads(list(model.parameters()), seed)
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
    for p in matrix_group(opt)["params"]:
        state = opt.state[p]
        u = state["basis"]
        rms = state["exp_avg_sq"] / (1 - betas[1] ** 3)
        denom = (rms + eps).sqrt() if inside else rms.sqrt() + eps  # inside: as the seed prints
        numerator = (before[p] - p.detach()) * denom / lr * (1 - betas[0] ** 3)
        torch.testing.assert_close(numerator, u @ state["exp_avg"], rtol=1e-3, atol=1e-5)
        assert torch.linalg.matrix_rank(numerator, rtol=1e-4) <= u.shape[1]
        assert (numerator - u @ (u.T @ numerator)).norm() < 1e-3 * numerator.norm()  # complement discarded


def test_rotate_policy_carries_momentum_into_the_new_basis():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "sam", update_proj_gap=2, stagger=False, moment_policy="rotate")
    set_grads(list(model.parameters()), 0)
    opt.step()
    set_grads(list(model.parameters()), 1)
    opt.step()
    p = model.model.layers[0].self_attn.q_proj.weight
    old_basis, old_avg = opt.state[p]["basis"].clone(), opt.state[p]["exp_avg"].clone()
    set_grads(list(model.parameters()), 2)
    opt.step()  # refresh on step 2
    new_basis = opt.state[p]["basis"]
    low = new_basis.T @ p.grad
    expected = 0.9 * (new_basis.T @ old_basis) @ old_avg + 0.1 * low
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["reset", "rotate", "keep"])
def test_constant_gradient_gives_a_constant_step_across_refreshes(policy):
    # With G constant the basis and the bias-corrected moments are constant, so every step is the
    # same; a reset momentum must be bias-corrected from its reset, not from the first step.
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    w = torch.nn.Parameter(torch.zeros(40, 24))
    opt = one_matrix_optimizer("sam", w, lr=1e-3, update_proj_gap=3, stagger=False, refresh="svd", moment_policy=policy)
    norms = update_norms(opt, w, [grad] * 10)
    torch.testing.assert_close(torch.tensor(norms), torch.full((10,), norms[0]), rtol=1e-5, atol=0)


def test_constant_gradient_gives_the_closed_form_step_and_the_basis_follows_the_gradient():
    # With G constant, U_k is G's top-k left singular space, M / c1 = U_k^T G and V / c2 = G^2:
    # W <- W (1 - lr wd) - lr U_k U_k^T G / sqrt(G^2 + eps). Refreshes (steps 3, 6) find U_k again.
    g = torch.Generator().manual_seed(0)
    grad, w0 = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    w = torch.nn.Parameter(w0.clone())
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = one_matrix_optimizer("sam", w, lr=lr, weight_decay=wd, eps=eps, update_proj_gap=3, refresh="svd")
    u = torch.linalg.svd(grad)[0][:, :4]  # k = min(5, 40 // 10)
    expected = w0.clone()
    for step in range(7):
        w.grad = grad.clone()
        opt.step()
        expected = expected * (1 - lr * wd) - lr * (u @ (u.T @ grad)) / (grad.square() + eps).sqrt()
        torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}")
    other = torch.randn(40, 24, generator=g)  # a new gradient: the next refresh (step 9) follows it
    for _ in range(3):
        w.grad = other.clone()
        opt.step()
    basis, u2 = opt.state[w]["basis"], torch.linalg.svd(other)[0][:, :4]
    torch.testing.assert_close(basis @ basis.T, u2 @ u2.T, rtol=0, atol=1e-4)


@pytest.mark.parametrize("hparams", [{}, {"rank": 3, "weight_decay": 0.1}, {"moment_policy": "reset", "refresh": "svd"},
                                     {"eps_inside_sqrt": False, "stagger": False}])
def test_batched_step_equals_the_per_matrix_step(hparams, monkeypatch):
    assert_batched_step_equals_per_matrix(SAM, "sam", monkeypatch, fixed_grads=True, **hparams)


def test_the_hf_form_is_left_to_the_per_matrix_step(monkeypatch):
    assert_routed_matrices_step_as_per_matrix(SAM, "sam", monkeypatch, update_proj_gap=3, adam_form="hf")


def test_full_rank_matrices_are_left_to_the_per_matrix_step(monkeypatch):
    """``k >= m`` (the identity basis: wide matrices at a rank above ``m``) steps one by one; the
    tall ones (``k`` capped at ``n < m``) still batch."""
    batched = []
    real = SAM._step_batch
    monkeypatch.setattr(SAM, "_step_batch", lambda self, g, ps: (batched.extend(ps), real(self, g, ps))[1])
    model = tiny_model()
    opt = distopt.build_optimizer(model, "sam", lr=1e-2, rank=10_000, update_proj_gap=3)
    group = matrix_group(opt)
    full = [p for p in group["params"] if SAM.plan(opt._views[p], group).full]
    before = {id(p): p.detach().clone() for p in full}
    train(model, opt, 2)
    assert full and batched and not {id(p) for p in batched} & set(before)
    assert all(not torch.equal(before[id(p)], p) for p in full)
