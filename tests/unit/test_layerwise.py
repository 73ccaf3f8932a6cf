"""Layer-wise mode: stepping each parameter inside backward equals a normal step, frees gradients
as it goes, and refuses what it cannot do."""

import pytest
import torch
from helpers import batch, tiny_model, train

import distopt
from distopt.engines import layerwise


@pytest.mark.parametrize("name", ["galore", "adamw", "golore"])
def test_layerwise_equals_a_normal_step(name):
    hp = dict(lr=1e-2) if name == "adamw" else dict(lr=1e-2, rank=6, update_proj_gap=3)
    ref = tiny_model()
    ref_opt = distopt.build_optimizer(ref, name, **hp)
    ref_opt.coalesce_bytes = 1  # matrices in batches of one, as layer-wise steps them: the same rounding
    train(ref, ref_opt, 8)

    model = tiny_model()
    opt = distopt.build_optimizer(model, name, **hp)
    handle = layerwise.attach(opt)
    for step in range(8):
        ids = batch(seed=1 + step % 4)
        model(ids, ids).backward()  # every parameter steps here
        assert all(p.grad is None for p in model.parameters())
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    handle.remove()
    train(model, opt, 1)  # back to step()


def test_gradients_are_freed_during_backward():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=6)
    layerwise.attach(opt)
    alive = []
    first = model.model.layers[-1].mlp.down_proj.weight  # among the first gradients produced

    def watch(_):
        alive.append(sum(p.grad is not None for p in model.parameters()))

    model.model.embed_tokens.weight.register_post_accumulate_grad_hook(watch)
    ids = batch()
    model(ids, ids).backward()
    assert first.grad is None
    assert alive == [0]  # the embedding steps last; by then every gradient has been used and freed


def test_calling_step_in_layerwise_mode_is_refused():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=6)
    layerwise.attach(opt)
    with pytest.raises(RuntimeError, match="layer-wise"):
        opt.step()


def test_only_distopt_optimizers():
    with pytest.raises(TypeError, match="distopt optimizer"):
        layerwise.attach(torch.optim.AdamW(tiny_model().parameters()))
