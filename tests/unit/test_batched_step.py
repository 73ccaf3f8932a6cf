"""The batched step of the projected-Adam family equals its per-matrix step, and takes what it can."""

from __future__ import annotations

import pytest
import torch
from helpers import batch, roundtrip, tiny_model, train

import distopt
from distopt.optim.projected import ProjectedAdam

CASES = [
    ("galore", {}),
    ("galore", {"side": "left", "weight_decay": 0.1, "scale": 0.5}),
    ("galore", {"moment_policy": "reset", "refresh": "svd"}),  # per-matrix bias corrections after staggered resets
    ("galore", {"stagger": False, "moment_policy": "transform"}),
    ("golore", {}),
    ("grassjump", {}),  # Fira's recovery term on (their default)
    ("subtrack", {}),
    ("grasswalk", {}),
    ("galore", {"recovery_scaling": True, "side": "left", "norm_growth_limit": 1.001}),
    ("galore", {"basis_dtype": "bf16", "moment_policy": "rotate"}),  # fp32 copies of bf16 bases, stored back
]


def _spy(monkeypatch, batched: bool) -> list:
    calls = []
    real = ProjectedAdam._step_batched

    def spy(self, group, params):
        calls.append(len(params))
        return real(self, group, params)

    monkeypatch.setattr(ProjectedAdam, "_step_batched", spy)
    real_batchable = ProjectedAdam._batchable
    monkeypatch.setattr(ProjectedAdam, "_batchable", lambda self, p, g: batched and real_batchable(self, p, g))
    return calls


@pytest.mark.parametrize("name,hparams", CASES)
def test_batched_step_equals_the_per_matrix_step(name, hparams, monkeypatch):
    """From the same state and gradients, one step each way: after 0 to 8 steps of training (gap 3,
    staggered, so every step refreshes some matrices), weights and every state tensor agree to the
    rounding of the fused ``addmm_`` accumulation."""
    calls = _spy(monkeypatch, batched=True)
    model = tiny_model()
    opt = distopt.build_optimizer(model, name, lr=1e-2, rank=6, update_proj_gap=3, **hparams)
    matrices = sum(len(g["params"]) for g in opt.param_groups if g["kind"] == "matrix")
    for step in range(9):
        ids = batch(seed=1 + step % 4)
        model(ids, ids).backward()
        twin_model = tiny_model(seed=1)
        twin_model.load_state_dict(model.state_dict())
        twin = distopt.build_optimizer(twin_model, name, lr=1e-2, rank=6, update_proj_gap=3, **hparams)
        twin.load_state_dict(roundtrip(opt.state_dict()))
        for a, b in zip(model.parameters(), twin_model.parameters()):
            b.grad = a.grad.clone()
        monkeypatch.setattr(ProjectedAdam, "_batchable", lambda self, p, g: False)
        twin.step()
        monkeypatch.undo()
        calls = _spy(monkeypatch, batched=True)
        opt.step()
        assert calls == [matrices], step  # every matrix took the batched path
        for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=n, step=step: f"step {step} {n}: {m}")
            for key, value in opt.state[a].items():
                torch.testing.assert_close(value, twin.state[b][key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m, key=key, step=step: f"step {step} {key}: {m}")
        opt.zero_grad(set_to_none=True)


def test_what_the_batched_step_leaves_to_the_per_matrix_path(monkeypatch):
    """The hf Adam form (galore-torch's op order) and full-rank matrices."""
    calls = _spy(monkeypatch, batched=True)
    for name, hparams in [("galore", {"adam_form": "hf"}), ("galore", {"rank": 1000})]:
        model = tiny_model()
        train(model, distopt.build_optimizer(model, name, **{"rank": 6, **hparams}), 2)
        assert calls == [], (name, hparams)
    train(model, distopt.build_optimizer(model, "galore", rank=6), 1)
    assert calls  # the spy sees the batched path where it runs


def test_batched_step_skips_a_non_finite_matrix_alone():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=6, update_proj_gap=3)
    train(model, opt, 2)
    params = dict(model.named_parameters())
    q = params["model.layers.0.self_attn.q_proj.weight"]
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = {k: v.clone() for k, v in opt.state[q].items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    q.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(opt.state[q][k], v) for k, v in state_before.items())
    assert not torch.equal(params["model.layers.0.self_attn.k_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"])


def test_batched_step_holds_at_most_coalesce_bytes_of_projected_tensors(monkeypatch):
    """R and N of at most ``coalesce_bytes`` worth of matrices are alive at once; chunking changes no bit."""
    results = []
    for limit in (None, 1, 20_000):
        calls = _spy(monkeypatch, batched=True)
        model = tiny_model()
        opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=6, update_proj_gap=3)
        if limit is not None:
            opt.coalesce_bytes = limit
        train(model, opt, 4)
        results.append(([p.detach().clone() for p in model.parameters()], list(calls)))
        monkeypatch.undo()
    (whole, one_call), (single, per_matrix), (some, chunked) = results
    matrices = one_call[0]
    assert one_call == [matrices] * 4 and per_matrix == [1] * (4 * matrices)
    assert 4 < len(chunked) < 4 * matrices and sum(chunked) == 4 * matrices
    for a, b, c in zip(whole, single, some):
        assert torch.equal(a, b) and torch.equal(a, c)
