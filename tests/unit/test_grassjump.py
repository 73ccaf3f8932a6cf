"""GrassJump: Haar jumps independent of the gradient, AO moment map, recovery scaling, state."""


import pytest
import torch
from helpers import set_grads, tiny_model
from optim_checks import matrices

import distopt
from distopt.core import moments, projector, subspace
from distopt.core.recovery import recovery_term
from distopt.core.shard import MatrixShardView
from distopt.optim.grassjump import GrassJump


def _run(grad_seed, steps, **kw):
    model = tiny_model()
    opt = distopt.build_optimizer(model, "grassjump", rank=4, update_proj_gap=3, stagger=False, **kw)
    for step in range(steps):
        set_grads(list(model.parameters()), grad_seed + step)
        opt.step()
    return opt


def test_jump_is_haar_and_independent_of_the_gradient():
    a, b = _run(0, 4), _run(100, 4)  # step 3 jumps
    for (_, sa, group, view), (_, sb, _, _) in zip(matrices(a), matrices(b)):
        plan = subspace.plan(view, group)
        assert torch.equal(sa["basis"], sb["basis"])
        eye = torch.eye(plan.rank)
        torch.testing.assert_close(sa["basis"].T @ sa["basis"], eye, rtol=0, atol=1e-5)
    # before the jump the bases came from the (different) gradients
    a0, b0 = _run(0, 1), _run(100, 1)
    assert not any(torch.allclose(x[1]["basis"], y[1]["basis"]) for x, y in zip(matrices(a0), matrices(b0)))


def test_jumps_are_uniform_on_the_grassmannian():
    # E[S S^T] = (r/d) I for a Haar basis; averaged over draws of successive refresh indices
    view = MatrixShardView("w", (6, 10))
    plan = subspace.SubspacePlan("left", 2, False, 0)
    group = {"seed": 0}
    draws = [GrassJump._haar(group, view, plan, i, "cpu") for i in range(1, 401)]
    mean = sum(s @ s.T for s in draws) / len(draws)
    torch.testing.assert_close(mean, torch.eye(6) / 3, rtol=0, atol=0.05)


def test_ao_transform_runs_at_the_switch_with_the_basis_held_until_then():
    model = tiny_model()
    beta1, beta2 = 0.8, 0.9
    opt = distopt.build_optimizer(model, "grassjump", rank=4, update_proj_gap=3, stagger=False, betas=(beta1, beta2))
    params = list(model.parameters())
    for step in range(3):
        set_grads(params, step)
        opt.step()
    before = {id(p): (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["basis"].clone()) for p, s, _, _ in matrices(opt)}
    set_grads(params, 3)
    opt.step()
    for p, state, group, view in matrices(opt):
        m_rot, v_rot, s_old = before[id(p)]
        side = subspace.plan(view, group).side
        s_new = state["basis"]
        c = s_new.T @ s_old
        unseen = projector.unseen_fraction(s_new, s_old, c, side, None)
        moments.apply_moment_policy("transform", side, c, m_rot, v_rot, step=3, betas=(beta1, beta2), unseen=unseen)
        low = s_new.T @ p.grad if side == "left" else p.grad @ s_new
        torch.testing.assert_close(state["exp_avg"], beta1 * m_rot + (1 - beta1) * low, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], beta2 * v_rot + (1 - beta2) * low.square(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("side", ["left", "right"])
def test_recovery_scaling_is_fira_with_a_growth_limiter(side):
    g = torch.Generator().manual_seed(0)
    m, n, r = 12, 9, 3
    view = MatrixShardView("w", (m, n))
    d = m if side == "left" else n
    basis = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
    last = torch.zeros(())

    def term(scale_grad):
        grad = scale_grad * torch.randn(m, n, generator=g)
        low = basis.T @ grad if side == "left" else grad @ basis
        direction = torch.randn(low.shape, generator=g)
        out = recovery_term(grad, low, direction, basis, side, view, last, 1.01)
        dim = 0 if side == "left" else 1
        phi = direction.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
        residual = grad - (basis @ low if side == "left" else low @ basis.T)
        return out, residual * (phi.unsqueeze(0) if side == "left" else phi.unsqueeze(1))

    first, raw = term(1.0)  # first step: recorded, not limited
    torch.testing.assert_close(first, raw)
    torch.testing.assert_close(last, first.norm())
    in_span = basis.T @ first if side == "left" else first @ basis
    torch.testing.assert_close(in_span, torch.zeros_like(in_span), rtol=0, atol=1e-5)  # orthogonal to S
    second, raw = term(10.0)  # grows ~10x: capped at 1.01x
    torch.testing.assert_close(second.norm(), 1.01 * first.norm())
    torch.testing.assert_close(second, raw * (1.01 * first.norm() / raw.norm()))
    third, raw = term(0.1)  # shrinking is never limited
    torch.testing.assert_close(third, raw)
    torch.testing.assert_close(last, third.norm())


