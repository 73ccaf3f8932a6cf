"""GoLore: Haar bases, the rotated first moment is persisted, state, checkpoints, bad input."""

import torch
from helpers import set_grads, tiny_model
from optim_checks import matrices

import distopt
from distopt.core import projector, subspace
from distopt.core.linalg import stable_seed


def test_rotated_first_moment_is_stored():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "golore", rank=4, update_proj_gap=3, stagger=False, betas=(0.8, 0.9))
    params = list(model.parameters())
    for step in range(3):
        set_grads(params, step)
        opt.step()
    before = {id(p): (s["exp_avg"].clone(), s["basis"].clone()) for p, s, _, _ in matrices(opt)}
    set_grads(params, 3)
    opt.step()  # step 3 refreshes every matrix (stagger=False)
    for p, state, group, view in matrices(opt):
        old_avg, old_basis = before[id(p)]
        plan = subspace.plan(view, group)
        new = state["basis"]
        assert not torch.allclose(new, old_basis)
        # the new basis is the seeded Haar draw of refresh 1, whatever the gradient
        expected_basis = projector.random_basis(view, plan.side, plan.rank, stable_seed(0, view.name, 1, "haar"), "cpu")
        torch.testing.assert_close(new, expected_basis, rtol=0, atol=0)
        c = new.T @ old_basis  # C = S_new^T S_old, computed by hand
        rotated = c @ old_avg if plan.side == "left" else old_avg @ c.T
        low = new.T @ p.grad if plan.side == "left" else p.grad @ new
        torch.testing.assert_close(state["exp_avg"], 0.8 * rotated + 0.2 * low, rtol=1e-5, atol=1e-7)
        # the reference code's bug (moment left unrotated) gives something else
        assert not torch.allclose(state["exp_avg"], 0.8 * old_avg + 0.2 * low, rtol=1e-3, atol=1e-5)


def test_galore_steps_use_the_gradient_then_haar():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "golore", rank=4, update_proj_gap=2, stagger=False, galore_steps=2,
                                  refresh="svd")
    params = list(model.parameters())
    set_grads(params, 0)
    opt.step()  # step 0: SVD of the gradient
    for p, state, group, view in matrices(opt):
        plan = subspace.plan(view, group)
        svd = projector.svd_basis(p.grad, view, plan.side, plan.rank)
        torch.testing.assert_close(state["basis"].abs(), svd.abs(), rtol=1e-4, atol=1e-5)
    for step in (1, 2):
        set_grads(params, step)
        opt.step()  # step 2: Haar
    for _p, state, group, view in matrices(opt):
        plan = subspace.plan(view, group)
        haar = projector.random_basis(view, plan.side, plan.rank, stable_seed(0, view.name, 1, "haar"), "cpu")
        assert torch.equal(state["basis"], haar)


