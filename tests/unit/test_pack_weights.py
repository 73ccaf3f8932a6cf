"""distopt.pack_weights: same-shape weights back to back in one buffer, written by one kernel per batch."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch, set_grads, tiny_model

import distopt
from distopt.core import batching


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr()


def test_same_shape_weights_lie_back_to_back_and_the_model_is_unchanged():
    model = tiny_model()
    ids = batch()
    before = model(ids, ids).item()
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    moved = distopt.pack_weights(model)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n]), n
    assert model(ids, ids).item() == before
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.dim() == 2:
            by_shape.setdefault(tuple(p.shape), []).append(p)
    packed = [ps for ps in by_shape.values() if len(ps) > 1]
    assert moved == sum(len(ps) for ps in packed) > 0
    for ps in packed:  # one storage per shape, each weight right after the previous one
        assert len({_storage(p) for p in ps}) == 1
        assert [p.storage_offset() for p in ps] == [i * ps[0].numel() for i in range(len(ps))]
        view = batching.packed_view(ps)
        assert view is not None and torch.equal(view, torch.stack(ps))
    storages = [_storage(p) for p in model.parameters()]
    assert distopt.pack_weights(model) == 0  # again: packed weights share their storage, so they stay
    assert [_storage(p) for p in model.parameters()] == storages


def test_weights_that_share_storage_or_are_strided_or_alone_stay_where_they_are():
    model = torch.nn.Module()
    model.a = torch.nn.Linear(4, 6, bias=False)
    model.b = torch.nn.Linear(4, 6, bias=False)
    model.c = torch.nn.Linear(4, 6, bias=False)
    model.register_buffer("alias", model.c.weight.detach()[0])  # another tensor on c's memory
    model.e = torch.nn.Linear(4, 6, bias=False)
    model.e.weight = torch.nn.Parameter(torch.randn(6, 8)[:, :4])  # a strided view of a larger tensor
    model.f = torch.nn.Linear(3, 5, bias=False)  # alone in its shape
    model.tied = model.a  # the same Parameter twice counts once
    storages = {n: _storage(p) for n, p in model.named_parameters()}
    assert distopt.pack_weights(model) == 2
    moved = {n for n, p in model.named_parameters() if _storage(p) != storages[n]}
    assert moved == {"a.weight", "b.weight"}
    assert model.alias.data_ptr() == model.c.weight.data_ptr()


def _pair(name: str, **hparams):
    model = tiny_model()
    twin = copy.deepcopy(model)
    assert distopt.pack_weights(twin) > 0
    options = dict(lr=1e-2, rank=6, update_proj_gap=3, **hparams)
    return (model, distopt.build_optimizer(model, name, **options)), (twin, distopt.build_optimizer(twin, name, **options))


@pytest.mark.parametrize("name,hparams", [
    ("galore", {"weight_decay": 0.1}),
    ("galore", {"side": "left", "scale": 0.5}),
    ("grassjump", {"weight_decay": 0.1}),  # Fira's term: the whole update added in one tensor
    ("subtrack", {}),
    ("galore", {"projection_precision": "bf16", "weight_decay": 0.1}),  # the product added, not fused into baddbmm
])
def test_a_step_on_packed_weights_equals_one_on_separate_weights(name, hparams, monkeypatch):
    """Through refreshes (gap 3, staggered), with weight decay: the weights written in their buffer by
    one kernel per batch agree with the per-weight update to the rounding of the batched product."""
    (model, opt), (twin, twin_opt) = _pair(name, **hparams)
    widths = []
    real = batching.add_updates
    monkeypatch.setattr(batching, "add_updates", lambda w, u, d: (widths.append(len(w)), real(w, u, d))[1])
    for step in range(7):
        set_grads(model.parameters(), seed=step)
        set_grads(twin.parameters(), seed=step)
        opt.step()
        calls = len(widths)
        twin_opt.step()
        # On packed weights a batch adds nothing weight by weight: one tensor (Fira's term) or no call.
        assert all(width == 1 for width in widths[calls:]), (step, widths[calls:])
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=n, step=step: f"step {step} {n}: {m}")
    assert any(abs(a - b).max() > 0 for a, b in zip(model.parameters(), tiny_model().parameters()))


def test_a_packed_weight_written_in_place_is_seen_by_autograd_as_modified():
    """A graph that saved a weight and runs backward after the step fails loudly, as with any in-place
    update, instead of differentiating through values that changed under it."""
    model = tiny_model()
    distopt.pack_weights(model)
    opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=6)
    set_grads(model.parameters(), seed=0)
    ids = batch()
    loss = model(ids, ids)
    versions = [p._version for p in model.parameters()]
    opt.step()
    matrices = next(g["params"] for g in opt.param_groups if g["kind"] == "matrix")
    assert all(p._version > v for p, v in zip(model.parameters(), versions) if any(p is q for q in matrices))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_weight_moved_out_of_its_buffer_is_stepped_where_it_now_lies():
    (model, opt), (twin, twin_opt) = _pair("galore", weight_decay=0.1)
    for step in range(4):
        if step == 2:  # another owner re-points one weight (a load with assign=True, say)
            for m in (model, twin):
                weight = m.model.layers[0].self_attn.k_proj.weight
                weight.data = weight.data.clone()
        set_grads(model.parameters(), seed=step)
        set_grads(twin.parameters(), seed=step)
        opt.step()
        twin_opt.step()
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=n, step=step: f"step {step} {n}: {m}")


def test_packed_view_is_found_only_for_consecutive_dense_weights_of_one_storage():
    buffer = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)
    weights = [torch.nn.Parameter(torch.zeros(3, 2)) for _ in range(4)]
    for i, w in enumerate(weights):
        w.data = buffer[i]  # re-pointed: no _base to go by
    for picked in ([0, 1, 2, 3], [1, 2]):
        view = batching.packed_view([weights[i] for i in picked])
        assert view is not None and view.data_ptr() == weights[picked[0]].data_ptr()
        assert torch.equal(view, buffer[picked])
    # A gap, a reversed order, another storage, a transposed (strided) square: no view.
    other = torch.zeros(2, 3, 2)[1]  # where weights[1] would be, but in another storage
    for tensors in ([weights[0], weights[2]], [weights[1], weights[0]], [weights[0], other], [w.T for w in weights]):
        assert batching.packed_view(tensors) is None
