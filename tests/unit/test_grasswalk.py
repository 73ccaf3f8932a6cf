"""GrassWalk: orthonormal geodesic steps at the requested distance, AO, state, checkpoints."""

import math

import pytest
import torch
from helpers import set_grads, tiny_model
from optim_checks import matrices

import distopt
from distopt.core import subspace
from distopt.core.grassmann import principal_angles


@pytest.mark.parametrize("tangent_rank,angle", [(None, 0.3), (1, 0.7), (2, math.pi / 2)])
def test_step_is_orthonormal_and_at_the_requested_geodesic_distance(tangent_rank, angle):
    model = tiny_model()
    rank = 4
    opt = distopt.build_optimizer(model, "grasswalk", rank=rank, update_proj_gap=2, stagger=False,
                                  walk_angle=angle, tangent_rank=tangent_rank)
    params = list(model.parameters())
    set_grads(params, 0)
    opt.step()
    old = {id(p): s["basis"].clone() for p, s, _, _ in matrices(opt)}
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2)
    opt.step()  # step 2 walks
    k = tangent_rank or rank
    for p, state, _, _ in matrices(opt):
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
        opt = distopt.build_optimizer(model, "grasswalk", rank=4, update_proj_gap=2, stagger=False, refresh="random")
        for step in range(3):
            set_grads(list(model.parameters()), grad_seed + step)
            opt.step()
        bases.append([s["basis"] for _, s, _, _ in matrices(opt)])
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
    before = {id(p): (s["exp_avg"].clone(), s["basis"].clone()) for p, s, _, _ in matrices(opt)}
    set_grads(params, 2)
    opt.step()
    for p, state, group, view in matrices(opt):
        m_old, s_old = before[id(p)]
        side = subspace.plan(view, group).side
        s_new = state["basis"]
        c = s_new.T @ s_old
        rotated = c @ m_old if side == "left" else m_old @ c.T
        low = s_new.T @ p.grad if side == "left" else p.grad @ s_new
        torch.testing.assert_close(state["exp_avg"], 0.8 * rotated + 0.2 * low, rtol=1e-5, atol=1e-7)


