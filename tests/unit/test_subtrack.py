"""SubTrack: tracking for both orientations, scale invariance, AO with the true previous basis,
row-shard parity, state, checkpoints."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import set_grads, tiny_model
from optim_checks import matrices

import distopt
from distopt.core import subspace
from distopt.core.shard import MatrixShardView
from distopt.optim.grasswalk import GrassWalk
from distopt.optim.subtrack import SubTrack


def _group(**kw):
    return {"step_size": 0.5, "max_angle": math.pi / 2, **kw}


def test_basis_moves_for_both_orientations_and_stays_orthonormal():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "subtrack", rank=4, update_proj_gap=2, stagger=False)
    params = list(model.parameters())
    set_grads(params, 0)
    opt.step()
    old = {id(p): s["basis"].clone() for p, s, _, _ in matrices(opt)}
    for step in (1, 2):
        set_grads(params, step)
        opt.step()  # step 2 tracks
    shapes = set()
    for p, state, group, view in matrices(opt):
        m, n = p.shape
        shapes.add(m >= n)
        new = state["basis"]
        assert subspace.plan(view, group).side == ("right" if m >= n else "left")
        assert (new - old[id(p)]).norm() > 1e-3, f"{opt.param_name(p)} ({m}x{n}) did not move"
        torch.testing.assert_close(new.T @ new, torch.eye(4), rtol=0, atol=2e-6)
    assert shapes == {True, False}  # square/tall (m >= n) and wide (m < n) matrices both tracked


@pytest.mark.parametrize("side,shape", [("left", (40, 60)), ("right", (60, 40)), ("right", (40, 40))])
def test_tracking_reduces_the_estimation_error_and_is_scale_invariant(side, shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    r = 4
    grad = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)
    view = MatrixShardView("w", shape)
    plan = subspace.SubspacePlan(side, r, False, 0)
    d = m if side == "left" else n
    basis = torch.linalg.qr(torch.randn(d, r, generator=g))[0]

    def error(s):
        captured = s @ (s.T @ grad) if side == "left" else grad @ s @ s.T
        return float((grad - captured).norm() / grad.norm())

    errors = [error(basis)]
    for _ in range(8):
        new, angle = SubTrack.track(basis, grad, _group(), view, plan)
        scaled, _ = SubTrack.track(basis, 1e4 * grad, _group(), view, plan)
        torch.testing.assert_close(scaled, new, rtol=0, atol=1e-5)  # same step whatever the gradient scale
        assert 0 < float(angle) <= 0.5
        basis = new
        errors.append(error(basis))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.9 * errors[0]


def test_ao_uses_the_basis_held_just_before_each_switch():
    model = tiny_model()
    beta1 = 0.8
    opt = distopt.build_optimizer(model, "subtrack", rank=4, update_proj_gap=2, stagger=False, betas=(beta1, 0.9))
    params = list(model.parameters())
    opt.allocate_state()
    initial = None
    for step in range(5):  # switches at steps 2 and 4
        set_grads(params, step)
        if step == 1:
            initial = {id(p): s["basis"].clone() for p, s, _, _ in matrices(opt)}
        before = {id(p): (s["exp_avg"].clone(), s["basis"].clone()) for p, s, _, _ in matrices(opt)}
        opt.step()
    for p, state, group, view in matrices(opt):
        m_old, s_old = before[id(p)]
        assert not torch.allclose(s_old, initial[id(p)])  # the first switch moved it
        side = subspace.plan(view, group).side
        c = state["basis"].T @ s_old
        rotated = c @ m_old if side == "left" else m_old @ c.T
        low = state["basis"].T @ p.grad if side == "left" else p.grad @ state["basis"]
        torch.testing.assert_close(state["exp_avg"], beta1 * rotated + (1 - beta1) * low, rtol=1e-5, atol=1e-7)


# -- the same code on row shards ------------------------------------------------------------------
SHARD_CASES = [("subtrack", (13, 10)), ("subtrack", (9, 14)), ("grasswalk", (13, 10)), ("grasswalk", (9, 14))]
SHARD_ROWS = {13: (7, 6), 9: (5, 4)}  # uneven row splits over two ranks
SHARD_STEPS = 5


def _steps_on_view(name, full_weight, grads, view, rows):
    """Run the algorithm's matrix step on this view's rows of ``full_weight``; returns the rows."""
    cls = {"subtrack": SubTrack, "grasswalk": GrassWalk}[name]
    opt = cls([torch.nn.Parameter(full_weight.clone())], rank=3, update_proj_gap=2, stagger=False, lr=1e-2)
    group = opt.param_groups[0]
    local = full_weight[rows[0]:rows[1]].clone()
    state = {"step": torch.tensor(0, dtype=torch.int64)}
    opt._init_matrix_state(local, state, group, view)
    for g in grads:
        opt._matrix_step(local, g[rows[0]:rows[1]], state, group, view)
    return local


def _shard_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, shape in SHARD_CASES:
            weight, grads = _shard_case(shape)
            counts = SHARD_ROWS[shape[0]]
            start = sum(counts[:rank])
            view = MatrixShardView("w", shape, start, start + counts[rank], dist.group.WORLD, counts)
            results[(name, shape)] = _steps_on_view(name, weight, grads, view, (start, start + counts[rank]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _shard_case(shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=g)
    grads = [torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
             + 0.1 * torch.randn(shape, generator=g) for _ in range(SHARD_STEPS)]
    return weight, grads


@pytest.mark.distributed
def test_row_shards_compute_what_one_process_computes(tmp_path):
    """Two gloo ranks with uneven row shards (left and right bases): tracking, walking, AO and
    recovery scaling give the rows one process computes."""
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, shape in SHARD_CASES:
        weight, grads = _shard_case(shape)
        whole = _steps_on_view(name, weight, grads, MatrixShardView("w", shape), (0, shape[0]))
        sharded = torch.cat([parts[0][(name, shape)], parts[1][(name, shape)]])
        assert not torch.allclose(whole, weight)
        torch.testing.assert_close(sharded, whole, rtol=1e-4, atol=1e-5, msg=lambda m, name=name, shape=shape: f"{name} {shape}: {m}")


