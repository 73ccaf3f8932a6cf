"""Moment maps at a basis change: properties that hold whatever the formula, on real states."""

import pytest
import torch
from helpers import batch, tiny_model
from optim_checks import one_matrix_optimizer, update_norms

import distopt
from distopt.core import moments, projector


def _snapshots(steps: tuple[int, ...], betas=(0.9, 0.999)) -> dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """``{t: [(side, exp_avg, exp_avg_sq), ...]}`` of every matrix of GaLore training the tiny model
    after ``t`` steps (no refresh before the last snapshot, so the moments are plain EMAs)."""
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=8, update_proj_gap=10_000, betas=betas)
    out = {}
    for t in range(1, max(steps) + 1):
        ids = batch(seed=1 + t % 4)
        model(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t in steps:
            out[t] = [(distopt.core.subspace.plan(opt._views[p], g).side, opt.state[p]["exp_avg"].clone(),
                       opt.state[p]["exp_avg_sq"].clone())
                      for g in opt.param_groups if g["kind"] == "matrix" for p in g["params"]]
    return out


@pytest.fixture(scope="module")
def real_states():
    return _snapshots((1, 5, 50, 500))


@pytest.mark.parametrize("t", [1, 5, 50, 500])
def test_transform_with_the_same_basis_changes_nothing(real_states, t):
    for side, m, v in real_states[t]:
        c = torch.eye(m.shape[0] if side == "left" else m.shape[1])
        m2, v2 = m.clone(), v.clone()
        moments.apply_moment_policy("transform", side, c, m2, v2, step=t, betas=(0.9, 0.999))
        torch.testing.assert_close(m2, m, rtol=1e-6, atol=0)
        torch.testing.assert_close(v2, v, rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [5, 500])
def test_transform_follows_a_reordered_basis_exactly(real_states, t):
    # Same subspace, basis vectors permuted and sign-flipped: the moments move with their vectors.
    for side, m, v in real_states[t]:
        r = m.shape[0] if side == "left" else m.shape[1]
        perm = torch.randperm(r, generator=torch.Generator().manual_seed(t))
        signs = torch.where(torch.arange(r) % 2 == 0, 1.0, -1.0)
        c = torch.eye(r)[perm] * signs[:, None]  # new_j = sign_j old_perm(j)
        m2, v2 = m.clone(), v.clone()
        moments.apply_moment_policy("transform", side, c, m2, v2, step=t, betas=(0.9, 0.999))
        m_moved = m[perm] * signs[:, None] if side == "left" else m[:, perm] * signs
        torch.testing.assert_close(m2, m_moved, rtol=1e-6, atol=0)
        torch.testing.assert_close(v2, v[perm] if side == "left" else v[:, perm], rtol=1e-5, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_transform_depends_on_the_bias_corrected_moments_only(side):
    # The same bias-corrected mean and second moment, held after 3 or after 500 updates: mapped
    # with a generic C, the results must agree once bias-corrected again.
    g = torch.Generator().manual_seed(0)
    old = torch.linalg.qr(torch.randn(12, 4, generator=g))[0]
    new = torch.linalg.qr(old + 0.5 * torch.randn(12, 4, generator=g))[0]
    c = projector.change_of_basis(new, old, side, None)
    shape = (4, 7) if side == "left" else (7, 4)
    mean = torch.randn(shape, generator=g)
    second = mean.square() + torch.rand(shape, generator=g)
    second.view(-1)[:5] = mean.view(-1)[:5].square() * 0.3  # where the short-horizon mean exceeds the RMS
    betas = (0.9, 0.999)
    mapped = []
    for t in (3, 500):
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        m, v = mean * c1, second * c2
        moments.apply_moment_policy("transform", side, c, m, v, step=t, betas=betas)
        mapped.append((m / c1, v / c2))
    torch.testing.assert_close(mapped[0][0], mapped[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mapped[0][1], mapped[1][1], rtol=1e-5, atol=1e-6)
    assert (mapped[0][1] > 0).all()


def test_transform_needs_the_step_and_betas():
    m, v, c = torch.zeros(2, 3), torch.zeros(2, 3), torch.eye(2)
    with pytest.raises(ValueError, match="moment updates"):
        moments.apply_moment_policy("transform", "left", c, m, v)


def test_transform_fills_directions_the_old_basis_never_saw():
    # A new basis orthogonal to the old one: the mean carries nothing over, and the second moment
    # of each new coordinate is the mean second moment of the old coordinates (per column).
    q = torch.linalg.qr(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))[0]
    old, new = q[:, :2], q[:, 2:]
    c = projector.change_of_basis(new, old, "left", None)
    m = torch.tensor([[0.3, -0.1, 0.0], [0.2, 0.4, -0.5]])
    v = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.8, 0.4]])
    m2, v2 = m.clone(), v.clone()
    moments.apply_moment_policy("transform", "left", c, m2, v2, step=1_000_000, betas=(0.9, 0.999))
    torch.testing.assert_close(m2, torch.zeros_like(m), rtol=0, atol=1e-7)
    torch.testing.assert_close(v2, v.mean(dim=0, keepdim=True).expand_as(v), rtol=1e-5, atol=1e-7)


def _exact_low_rank_steps(policy: str, refresh: str, side: str, steps: int = 14) -> list[float]:
    """Update norms of GaLore on a constant rank-3 gradient, refreshing every 5 steps."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(24, 3, generator=g))[0]
    vt = torch.linalg.qr(torch.randn(18, 3, generator=g))[0].T
    grad = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ vt
    w = torch.nn.Parameter(torch.zeros(24, 18))
    opt = one_matrix_optimizer("galore", w, lr=1e-3, rank=3, update_proj_gap=5, stagger=False, refresh=refresh, side=side,
                               moment_policy=policy, scale=1.0)
    return update_norms(opt, w, [grad] * steps)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("refresh", ["svd", "randomized"])
@pytest.mark.parametrize("policy", ["keep", "rotate", "transform", "reset"])
def test_a_refresh_onto_the_same_subspace_keeps_the_step(policy, refresh, side):
    # A constant gradient gives Adam a constant step; refreshes at steps 5 and 10 find the same
    # subspace again, so no policy that maps moments between bases may change the step there.
    # ``reset`` restarts the moments and their bias correction: Adam's first step, the same size.
    norms = _exact_low_rank_steps(policy, refresh, side)
    # Adam's step on a constant gradient is sign(R): lr sqrt(#coordinates of R) in norm (R: 3 x 18 or 24 x 3).
    expected = 1e-3 * (3 * 18 if side == "left" else 24 * 3) ** 0.5
    torch.testing.assert_close(torch.tensor(norms), torch.full((len(norms),), expected), rtol=1e-4, atol=0)


def _in_subspace_step_norms(policy: str, periods: int = 10, gap: int = 25) -> list[float]:
    """``||N||`` per step of GrassJump (the Adam direction in the subspace, read from the update with
    ``scale=1``, no recovery term, no decay) on a stationary noisy gradient stream."""
    g = torch.Generator().manual_seed(0)
    m, n = 64, 48
    signal = torch.randn(m, n, generator=g) * 0.3
    w = torch.nn.Parameter(torch.zeros(m, n))
    lr = 1e-3
    opt = one_matrix_optimizer("grassjump", w, lr=lr, rank=8, update_proj_gap=gap, stagger=False, scale=1.0,
                               recovery_scaling=False, moment_policy=policy)
    grads = [signal + torch.randn(m, n, generator=g) for _ in range(gap * periods)]
    return [norm / lr for norm in update_norms(opt, w, grads)]


def test_grassjump_steps_do_not_grow_across_jumps():
    # After a jump the momentum starts nearly afresh (the old mean has little overlap with the new
    # subspace), so the step dips and recovers; it must never grow past the steady step.
    gap = 25
    norms = _in_subspace_step_norms("transform", gap=gap)
    steady = sum(norms[10:gap]) / (gap - 10)  # before the first jump, once the moments settled
    after = norms[gap:]  # nine jumps to unrelated (Haar) subspaces
    assert max(after) <= 1.5 * steady, (max(after), steady)
    late = [sum(norms[p * gap + 10:(p + 1) * gap]) / (gap - 10) for p in range(1, 10)]
    assert max(late) <= 1.2 * steady and min(late) >= steady / 1.2, (late, steady)
