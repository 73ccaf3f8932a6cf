"""GaLore: parity with torch AdamW and galore-torch, state, checkpoints, and bad input."""

import copy
import math
import types
import warnings

import pytest
import torch
from helpers import batch, roundtrip, set_grads, side_by_side, tiny_model, train
from optim_checks import (
    projected_adam_bytes,
    state_bytes_formula,
)

import distopt
from distopt.core import projector


def _grads_like(model, seed):
    set_grads([p for p in model.parameters()], seed)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_full_rank_equals_torch_adamw_whatever_the_scale(scale):
    # Nothing is projected at full rank, so there is nothing for ``scale`` to compensate.
    model = tiny_model()
    ref = copy.deepcopy(model)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = distopt.build_optimizer(model, "galore", rank=10_000, refresh="svd", scale=scale, stagger=False, **kw)
    adamw = torch.optim.AdamW(ref.parameters(), **kw)
    for step in range(12):
        for m in (model, ref):
            _grads_like(m, step)
        ours.step()
        adamw.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def _galore_torch_pair(model, rank, gap, scale, lr, wd, betas, eps, **ours_kw):
    galore_torch = pytest.importorskip("galore_torch")
    ours = distopt.build_optimizer(
        model, "galore", lr=lr, rank=rank, update_proj_gap=gap, scale=scale, refresh="svd", stagger=False,
        betas=betas, eps=eps, weight_decay=wd, **ours_kw,
    )
    ref_model = copy.deepcopy(model)
    by_name = dict(ref_model.named_parameters())
    groups = []
    for g in ours.param_groups:
        params = [by_name[n] for n in g["param_names"]]
        if g["kind"] == "matrix":
            groups.append({"params": params, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"})
        else:
            groups.append({"params": params})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = galore_torch.GaLoreAdamW(groups, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    return ours, ref_model, ref


@pytest.mark.parametrize("adam_form,steps,eps", [("hf", 10, 1e-6), ("torch", 4, 1e-12)])
def test_reproduces_galore_torch_step_for_step(adam_form, steps, eps):
    """galore-torch (PyPI) is the oracle. With ``adam_form="hf"`` (its Adam form) the parameters are
    bit-identical through three SVD refreshes with kept moments. The default torch form adds eps
    after bias correction (as torch.optim.AdamW does), so it matches when eps is negligible; its
    rounding differs, and an SVD refresh of a gradient with near-equal singular values can then pick
    other singular vectors, so that form is compared up to the first re-refresh only."""
    model = tiny_model()
    ours, ref_model, ref = _galore_torch_pair(
        model, rank=6, gap=4, scale=0.25, lr=1e-2, wd=0.01, betas=(0.9, 0.999), eps=eps, adam_form=adam_form,
    )
    matrices = {n for g in ours.param_groups if g["kind"] == "matrix" for n in g["param_names"]}
    for step in side_by_side([(model, ours), (ref_model, ref)], steps):  # refreshes on steps 0, 4 and 8
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            if adam_form == "hf":
                assert torch.equal(a, b), f"step {step}: {name}"
            elif name in matrices:  # element-wise rows with near-zero gradients are eps-dominated
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, step=step, name=name: f"step {step}: {name}: {m}")


def test_defaults_are_randomized_and_staggered():
    opt = distopt.build_optimizer(tiny_model(), "galore")
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    assert group["refresh"] == "randomized" and group["stagger"] is True


def test_longer_side_projects_the_longer_dimension_and_holds_less_state():
    assert [projector.resolve_side("longer", s) for s in ((30, 20), (20, 30), (20, 20))] == ["left", "right", "right"]
    assert [projector.resolve_side("auto", s) for s in ((30, 20), (20, 30), (20, 20))] == ["right", "left", "right"]
    held = {}
    for side in ("auto", "longer"):
        model = tiny_model()
        opt = distopt.build_optimizer(model, "galore", rank=4, side=side)
        set_grads(list(model.parameters()), 0)
        opt.step()
        held[side] = distopt.state_bytes(opt)
    # each non-square m x n matrix holds r (max + 2 min) instead of r (min + 2 max) fp32 values
    saved = sum(4 * 4 * abs(p.shape[0] - p.shape[1]) for n, p in model.named_parameters()
                if p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    assert saved > 0 and held["auto"] - held["longer"] == saved


def test_low_precision_params_keep_fp32_state():
    model = tiny_model().to(torch.bfloat16)
    opt = distopt.build_optimizer(model, "galore", rank=8)
    train(model, opt, 3)
    for state in opt.state.values():
        for key, t in state.items():
            if key != "step":
                assert t.dtype == torch.float32
    assert distopt.state_bytes(opt) == state_bytes_formula(opt, projected_adam_bytes)


def test_state_dict_is_plain_and_keyed_by_name():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=8, update_proj_gap=3)
    train(model, opt, 2)
    sd = roundtrip(opt.state_dict())  # weights_only=True
    assert set(sd["state"]) == {n for n, _ in model.named_parameters()}
    allowed = (torch.Tensor, int, float, str, bool, type(None))

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check(v)
        else:
            assert isinstance(value, allowed), type(value)

    check(sd)
    assert sd["distopt"]["algorithm"] == "galore"


def test_checkpoint_with_other_shapes_or_algorithm_is_refused():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=8)
    train(model, opt, 1)
    sd = roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match="rank"):
        distopt.build_optimizer(tiny_model(), "galore", rank=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="'galore'"):
        distopt.build_optimizer(tiny_model(), "adamw").load_state_dict(sd)


def test_changed_hyperparameters_apply_after_a_load_and_are_reported():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=8, scale=0.25, weight_decay=0.0, betas=(0.9, 0.999))
    train(model, opt, 2)
    sd = roundtrip(opt.state_dict())
    again = distopt.build_optimizer(tiny_model(), "galore", rank=8, scale=0.5, weight_decay=0.1, betas=(0.8, 0.99))
    again.load_state_dict(sd)
    matrix = next(g for g in again.param_groups if g["kind"] == "matrix")
    assert (matrix["scale"], matrix["weight_decay"], matrix["betas"]) == (0.5, 0.1, (0.8, 0.99))
    changes = " ".join(again.resumed_changes)
    assert "scale: 0.25 in the checkpoint -> 0.5 now" in changes and "weight_decay" in changes and "betas" in changes


def test_a_refused_checkpoint_leaves_the_state_untouched():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=8)
    train(model, opt, 2)
    sd = roundtrip(opt.state_dict())
    sd["param_groups"][-1]["params"] = list(reversed(sd["param_groups"][-1]["params"]))  # a foreign layout
    fresh = distopt.build_optimizer(tiny_model(), "galore", rank=8)
    fresh.allocate_state()
    before = {n: {k: v.clone() for k, v in fresh.state[p].items()} for p, n in fresh._names.items()}
    with pytest.raises(ValueError, match="different parameters"):
        fresh.load_state_dict(sd)
    for p, n in fresh._names.items():
        assert all(torch.equal(fresh.state[p][k], v) for k, v in before[n].items()), n


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match=r"unknown optimizer 'galor'.*Did you mean 'galore'"):
        distopt.build_optimizer(tiny_model(), "galor")
    assert "galore" in distopt.list_optimizers() and "adamw" in distopt.list_optimizers()


class _FlatShardModel(torch.nn.Module):
    """What ZeRO or FSDP1 hands over: a q_proj weight flattened to 1-D."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Module()
        self.q_proj.weight = torch.nn.Parameter(torch.randn(1380))


def test_flat_shard_in_matrix_group_names_cause_and_fix():
    with pytest.raises(ValueError) as err:
        distopt.build_optimizer(_FlatShardModel(), "galore")
    message = str(err.value)
    assert "q_proj.weight" in message and "(1380,)" in message
    assert "ZeRO" in message and "distopt.deepspeed.initialize" in message and "FSDP2" in message


def test_a_3d_weight_in_the_matrix_group_is_named_as_such():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Module()
    model.q_proj.weight = torch.nn.Parameter(torch.randn(4, 6, 5))
    with pytest.raises(ValueError, match=r"\(4, 6, 5\).*3-D tensor.*rules=\[\(pattern, 'other'\)\]"):
        distopt.build_optimizer(model, "galore")


def test_flat_shard_swapped_in_at_step_time_is_refused():
    # DeepSpeed replaces param_group["params"] with a flat partition after construction.
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=4)
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    flat = torch.nn.Parameter(torch.randn(100))
    flat.grad = torch.randn(100)
    opt._names[flat] = "flat_partition"
    group["params"][0] = flat
    with pytest.raises(ValueError, match="flat 1-D tensor"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_param_state_and_basis_untouched(bad):
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=6, update_proj_gap=2)
    train(model, opt, 3)
    q = model.model.layers[0].self_attn.q_proj.weight
    emb = model.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in opt.state[q].items()}
    emb_state_before = {k: v.clone() for k, v in opt.state[emb].items()}
    ids = batch(seed=9)
    model(ids, ids).backward()
    q.grad[0, 0] = bad
    emb.grad[3, 1] = bad
    opt.step()  # step 3 is a refresh step for phase-0 matrices at gap 2? stagger decides; either way untouched
    assert torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(emb, before["model.embed_tokens.weight"])
    for key, value in state_before.items():
        assert torch.equal(opt.state[q][key], value), key
    for key, value in emb_state_before.items():
        assert torch.equal(opt.state[emb][key], value), key
    k = model.model.layers[0].self_attn.k_proj.weight
    assert not torch.equal(k, before["model.layers.0.self_attn.k_proj.weight"])  # others stepped
    assert opt.nonfinite_skips == {"model.layers.0.self_attn.q_proj.weight": 1, "model.embed_tokens.weight": 1}
    opt.zero_grad()
    losses = train(model, opt, 4)
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(t).all() for s in opt.state.values() for t in s.values())


def test_a_step_with_every_gradient_nonfinite_or_missing_moves_nothing():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", rank=6, update_proj_gap=2)
    train(model, opt, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    ids = batch(seed=9)
    model(ids, ids).backward()
    emb = model.model.embed_tokens.weight
    emb.grad = None  # no gradient: not stepped, not counted as skipped
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        for key, value in states[id(p)].items():
            assert torch.equal(opt.state[p][key], value), (n, key)
    assert len(opt.nonfinite_skips) == sum(1 for _ in model.parameters()) - 1
    assert "model.embed_tokens.weight" not in opt.nonfinite_skips


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
@pytest.mark.parametrize("name", distopt.list_optimizers())
def test_an_empty_weight_is_stepped_element_wise(name, shape):
    # A matrix with no rows or no columns has nothing to project: it joins the element-wise group.
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(num_attention_heads=1, num_key_value_heads=1, hidden_size=5)
    model.self_attn = torch.nn.Module()
    model.self_attn.q_proj = torch.nn.Linear(shape[1], shape[0], bias=False)
    model.self_attn.v_proj = torch.nn.Linear(5, 5, bias=False)
    opt = distopt.build_optimizer(model, name)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    opt.load_state_dict(roundtrip(opt.state_dict()))
    groups = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert all(kind == "adamw" for n, kind in groups.items() if "q_proj" in n)


def spy_on(function, seen: list):
    """``function``, recording the TF32 flag into ``seen`` on each call."""

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return function(*args, **kwargs)

    return spy


def test_the_step_runs_fp32_matmuls_whatever_the_tf32_flag(monkeypatch):
    from distopt.core import subspace

    seen = []
    real = subspace.project_grad

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(*args, **kwargs)

    monkeypatch.setattr(subspace, "project_grad", spy)
    monkeypatch.setattr(torch, "matmul", spy_on(torch.matmul, seen))
    monkeypatch.setattr(torch, "bmm", spy_on(torch.bmm, seen))  # the batched step's products
    previous = torch.backends.cuda.matmul.allow_tf32  # a property of torch's module: set and restore by hand
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model = tiny_model()
        opt = distopt.build_optimizer(model, "galore", rank=8)
        train(model, opt, 2)
        assert seen and not any(seen)  # off inside the step
        assert torch.backends.cuda.matmul.allow_tf32  # and the caller's setting is back
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("batched", [True, False])
def test_tf32_projections_are_opt_in_and_never_reach_the_refresh(monkeypatch, batched):
    from distopt.core import subspace
    from distopt.optim import projected

    seen = {"project": [], "refresh": []}
    real_project, real_basis = subspace.project_grad, distopt.optim.GaLore._new_basis

    def project(*args, **kwargs):
        seen["project"].append(torch.backends.cuda.matmul.allow_tf32)
        return real_project(*args, **kwargs)

    def new_basis(self, *args, **kwargs):
        seen["refresh"].append(torch.backends.cuda.matmul.allow_tf32)
        return real_basis(self, *args, **kwargs)

    monkeypatch.setattr(subspace, "project_grad", project)
    monkeypatch.setattr(torch, "matmul", spy_on(torch.matmul, seen["project"]))
    monkeypatch.setattr(torch, "bmm", spy_on(torch.bmm, seen["project"]))  # the batched step's products
    monkeypatch.setattr(distopt.optim.GaLore, "_new_basis", new_basis)
    if not batched:
        monkeypatch.setattr(projected.ProjectedAdam, "_batchable", lambda self, p, g: False)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for precision, want in (("fp32", False), ("tf32", True)):
            seen["project"].clear(), seen["refresh"].clear()
            model = tiny_model()
            train(model, distopt.build_optimizer(model, "galore", rank=8, projection_precision=precision), 2)
            assert seen["project"] and set(seen["project"]) == {want}, precision
            assert seen["refresh"] and not any(seen["refresh"]), precision
            assert torch.backends.cuda.matmul.allow_tf32 == previous
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    with pytest.raises(ValueError, match="projection_precision='fp16'"):
        distopt.build_optimizer(tiny_model(), "galore", projection_precision="fp16")


@pytest.mark.parametrize("batched", [True, False])
def test_bf16_projections_take_bf16_operands_keep_fp32_state_and_never_reach_the_refresh(monkeypatch, batched):
    from distopt.optim import projected

    operands, refresh_dtypes = [], []
    real_basis = distopt.optim.GaLore._new_basis

    def recorded(product):
        def record(a, b, *args, **kwargs):  # on a CPU, bf16 operands come rounded, in fp32
            operands.append(tuple(torch.equal(x, x.bfloat16().float()) for x in (a, b)))
            return product(a, b, *args, **kwargs)

        return record

    def new_basis(self, *args, **kwargs):
        refresh_dtypes.append(projector._product_dtype.get())
        return real_basis(self, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", recorded(torch.matmul))
    monkeypatch.setattr(torch, "bmm", recorded(torch.bmm))  # the batched fp32 products
    monkeypatch.setattr(distopt.optim.GaLore, "_new_basis", new_basis)
    if not batched:
        monkeypatch.setattr(projected.ProjectedAdam, "_batchable", lambda self, p, g: False)
    models = {}
    torch.manual_seed(0)
    start = [p.detach().clone() for p in tiny_model().parameters()]
    for precision in ("fp32", "bf16"):
        operands.clear(), refresh_dtypes.clear()
        torch.manual_seed(0)
        model = models[precision] = tiny_model()
        opt = distopt.build_optimizer(model, "galore", rank=8, lr=1e-2, update_proj_gap=2, projection_precision=precision)
        train(model, opt, 3)
        want = precision == "bf16"  # fp32 operands are not all representable in bf16
        assert operands and set(operands) == {(want, want)}, precision
        assert refresh_dtypes and set(refresh_dtypes) == {None}, precision  # refreshes stay fp32
        states = [opt.state[p] for g in opt.param_groups for p in g["params"] if "basis" in opt.state[p]]
        assert states and all(s[k].dtype == torch.float32 for s in states for k in ("basis", "exp_avg", "exp_avg_sq"))
    assert projector._product_dtype.get() is None
    # bf16 operands round at 2^-8: the runs part by more than fp32 rounding, by a few percent of the
    # distance travelled.
    travelled = torch.cat([(p - p0).flatten() for p, p0 in zip(models["fp32"].parameters(), start)]).norm()
    gap = torch.cat([(a - b).flatten() for a, b in zip(models["fp32"].parameters(), models["bf16"].parameters())]).norm()
    assert 1e-4 < gap / travelled < 0.05, (gap / travelled).item()
