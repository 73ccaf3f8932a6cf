"""GrassWalk: orthonormal geodesic steps at the requested distance, AO, state, checkpoints."""

import math

import pytest
import torch
from helpers import assert_resume_bit_identical, set_grads, tiny_model, train

import distopt
from distopt.core import projector, subspace
from distopt.core.grassmann import principal_angles


def _state_bytes_formula(opt):
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if group["kind"] == "adamw":
                total += 4 + 8 * p.numel()
                continue
            m, n = p.shape
            plan = subspace.plan(opt._views[p], group)
            if plan.full:
                total += 8 + 8 * m * n
                continue
            d = projector.side_dim(plan.side, (m, n))
            total += 8 + 4 * (d * plan.rank + 2 * plan.rank * (m * n // d)) + (4 if group["recovery_scaling"] else 0)
    return total


def _matrices(opt):
    return [(p, opt.state[p], group, opt._views[p]) for group in opt.param_groups if group["kind"] == "matrix"
            for p in group["params"]]


@pytest.mark.parametrize("tangent_rank,angle", [(None, 0.3), (1, 0.7), (2, math.pi / 2)])
def test_step_is_orthonormal_and_at_the_requested_geodesic_distance(tangent_rank, angle):
    model = tiny_model()
    rank = 4
    opt = distopt.build_optimizer(model, "grasswalk", rank=rank, update_proj_gap=2, stagger=False,
                                  walk_angle=angle, tangent_rank=tangent_rank)
    params = list(model.parameters())
    set_grads(params, 0)
    opt.step()
    old = {id(p): s["basis"].clone() for p, s, _, _ in _matrices(opt)}
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2)
    opt.step()  # step 2 walks
    k = tangent_rank or rank
    for p, state, _, _ in _matrices(opt):
        new = state["basis"]
        torch.testing.assert_close(new.T @ new, torch.eye(rank), rtol=0, atol=2e-6)
        angles = principal_angles(old[id(p)], new)
        moved = angles[angles > 1e-3]
        assert len(moved) == k
        # RMS principal angle = walk_angle, geodesic distance = walk_angle * sqrt(k), unless capped at pi/2
        if angle * math.sqrt(k) <= math.pi / 2:
            torch.testing.assert_close(angles.square().sum().sqrt().item(), angle * math.sqrt(k), rtol=1e-4, atol=1e-4)
        else:
            assert moved.max() <= math.pi / 2 + 1e-4


def test_walk_is_seeded_and_independent_of_the_gradient():
    bases = []
    for grad_seed in (0, 50):
        model = tiny_model()
        opt = distopt.build_optimizer(model, "grasswalk", rank=4, update_proj_gap=2, stagger=False, init="random")
        for step in range(3):
            set_grads(list(model.parameters()), grad_seed + step)
            opt.step()
        bases.append([s["basis"] for _, s, _, _ in _matrices(opt)])
    for a, b in zip(*bases):
        assert torch.equal(a, b)


def test_moments_follow_the_walk():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "grasswalk", rank=4, update_proj_gap=2, stagger=False, betas=(0.8, 0.9),
                                  walk_angle=0.5)
    params = list(model.parameters())
    for step in range(2):
        set_grads(params, step)
        opt.step()
    before = {id(p): (s["exp_avg"].clone(), s["basis"].clone()) for p, s, _, _ in _matrices(opt)}
    set_grads(params, 2)
    opt.step()
    for p, state, group, view in _matrices(opt):
        m_old, s_old = before[id(p)]
        side = subspace.plan(view, group).side
        s_new = state["basis"]
        c = s_new.T @ s_old
        rotated = c @ m_old if side == "left" else m_old @ c.T
        low = s_new.T @ p.grad if side == "left" else p.grad @ s_new
        torch.testing.assert_close(state["exp_avg"], 0.8 * rotated + 0.2 * low, rtol=1e-5, atol=1e-7)


def test_lowers_the_loss():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "grasswalk", lr=1e-2, rank=8, update_proj_gap=10)
    losses = train(model, opt, 50)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("rank,rs", [(8, True), (8, False), (1000, True)])
def test_state_bytes_match_the_formula(rank, rs):
    model = tiny_model()
    opt = distopt.build_optimizer(model, "grasswalk", rank=rank, update_proj_gap=3, recovery_scaling=rs)
    opt.allocate_state()
    before = distopt.state_bytes(opt)
    train(model, opt, 4)
    assert distopt.state_bytes(opt) == before == _state_bytes_formula(opt)


def test_resume_is_bit_identical():
    assert_resume_bit_identical("grasswalk", lr=1e-2, rank=6, update_proj_gap=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank=0"),
        (dict(walk_angle=0.0), "walk_angle=0.0"),
        (dict(walk_angle=2.0), "walk_angle=2.0"),
        (dict(walk_angle=float("nan")), "walk_angle=nan"),
        (dict(tangent_rank=0), "tangent_rank=0"),
        (dict(tangent_rank=1.5), "tangent_rank=1.5"),
        (dict(init="qr"), "init='qr'"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit=0.5"),
        (dict(moment_policy="spin"), "moment_policy='spin'"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distopt.build_optimizer(tiny_model(), "grasswalk", **kwargs)
