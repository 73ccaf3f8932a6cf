"""RSO: frozen W, r x n factor gradients (the parameter holds B^T, n x r), s x r saved activations,
merges, state, checkpoints, FSDP2 row shards."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import batch, op_counter, roundtrip, set_grads, tiny_model, train
from torch import nn

import distopt
from distopt.core.schedule import refresh_phase
from distopt.core.shard import is_dtensor, local
from distopt.models import LlamaShape, TinyLlama
from distopt.optim.rso import RSO, SubspaceLinear, reparametrize, sample_projection, subspace_linears, unwrap

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _saved(fn):
    """Shapes and identities of every tensor autograd saves while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_build_reparametrizes_attention_and_mlp_linears_in_place():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "rso", rank=4)
    layers = subspace_linears(model)
    assert len(layers) == 7 * model.shape.num_hidden_layers
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SubspaceLinear)
    matrix = next(g for g in opt.param_groups if g["kind"] == "matrix")
    assert all(n.endswith(".rso_b") for n in matrix["param_names"]) and len(matrix["params"]) == len(layers)
    trained = {n for g in opt.param_groups for n in g["param_names"]}
    assert not any(n.endswith(f"{name}.weight") for n in trained for name in LINEAR_NAMES)


def test_w_is_frozen_and_the_factor_gradient_is_r_by_n_stored_transposed():
    model = tiny_model()
    distopt.build_optimizer(model, "rso", rank=4)
    ids = batch()
    model(ids, ids).backward()
    for layer in subspace_linears(model):
        assert layer.weight.grad is None and not layer.weight.requires_grad
        # B is r x n; its parameter holds B^T (n x r) so that its rows pair with W's rows
        assert layer.rso_b.grad.shape == (layer.out_features, 4) and layer.rank == 4
        assert layer.rso_p.shape == (layer.in_features, 4)


def test_only_the_s_by_r_product_is_saved():
    torch.manual_seed(0)
    b, s, d_in, d_out, r = 3, 7, 40, 24, 5
    linear = nn.Linear(d_in, d_out, bias=True)
    layer = SubspaceLinear(copy.deepcopy(linear), sample_projection(d_in, r, "haar", 1.0, 0))
    x = torch.randn(b, s, d_in, requires_grad=True)
    y, saved = _saved(lambda: layer(x))
    weights = {id(t) for t in (layer.weight, layer.rso_p, layer.rso_b)}
    activations = [t for t in saved if id(t) not in weights]
    assert [tuple(t.shape) for t in activations] == [(b, s, r)]  # x P, not x (b, s, in)
    assert not any(t.shape[-1] == d_in and t.numel() == x.numel() for t in saved)
    # a trainable Linear keeps the whole input instead
    _, saved_linear = _saved(lambda: linear(x))
    assert any(t.numel() == x.numel() and t.shape[-1] == d_in for t in saved_linear)
    # and the saved bytes of a whole model shrink accordingly
    ids = batch()
    plain = tiny_model()
    _, saved_plain = _saved(lambda: plain(ids, ids))
    reparam = tiny_model()
    distopt.build_optimizer(reparam, "rso", rank=4)
    _, saved_rso = _saved(lambda: reparam(ids, ids))
    params = {id(t) for m in (plain, reparam) for t in list(m.parameters()) + list(m.buffers())}

    def act_bytes(ts):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in ts if id(t) not in params}.values())

    assert act_bytes(saved_rso) < act_bytes(saved_plain)


def test_gradients_match_the_reparametrized_formula():
    torch.manual_seed(0)
    d_in, d_out, r = 9, 6, 3
    layer = SubspaceLinear(nn.Linear(d_in, d_out, bias=False).double(), sample_projection(d_in, r, "gaussian", 1.0, 1).double())
    with torch.no_grad():
        layer.rso_b.normal_()
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    gx, gb = x.grad.clone(), layer.rso_b.grad.clone()
    x.grad = None
    b = layer.rso_b.detach().T.clone().requires_grad_(True)  # B, r x out
    (x @ (layer.weight + (layer.rso_p @ b).T).T).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    assert b.grad.shape == (r, d_out)
    torch.testing.assert_close(gb, b.grad.T)  # the stored factor's gradient is B's, transposed


@pytest.mark.parametrize("layout", ["partitioned", "replicated"])
def test_merge_leaves_the_function_unchanged_and_restarts_the_inner_problem(layout):
    model = tiny_model()
    opt = distopt.build_optimizer(model, "rso", rank=4, lr=1e-2, update_proj_gap=100, state_layout=layout)
    train(model, opt, 3)
    ids = batch()
    with torch.no_grad():
        before = model(ids)
    weights = [layer.weight.clone() for layer in subspace_linears(model)]
    projs = [layer.rso_p.clone() for layer in subspace_linears(model)]
    for group in opt.param_groups:
        if group["kind"] == "matrix":
            for p in group["params"]:
                assert p.abs().sum() > 0
                opt.merge(p, opt.state[p], group, opt._views[p], index=1)
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for layer, w, proj in zip(subspace_linears(model), weights, projs):
        assert torch.count_nonzero(layer.rso_b) == 0 and not torch.equal(layer.weight, w)
        assert not torch.equal(layer.rso_p, proj)
        state = opt.state[layer.rso_b]
        # The layer holds P (a frozen parameter, or a buffer), and the optimizer accounts for it.
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.projections_in_model()[layer.rso_b] is layer.rso_p
        if layout == "partitioned":
            assert isinstance(layer.rso_p, nn.Parameter) and not layer.rso_p.requires_grad
        else:
            assert any(b is layer.rso_p for b in model.buffers())
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0


def test_merges_happen_every_tau_steps():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "rso", rank=4, lr=1e-2, update_proj_gap=3, stagger=False)
    factors = [layer.rso_b for layer in subspace_linears(model)]
    nonzero = []
    for step in range(7):
        train(model, opt, 1, data_seed=step)
        nonzero.append(all(torch.count_nonzero(b) > 0 for b in factors))
    assert nonzero == [True, True, False, True, True, False, True]  # merged after steps 2 and 5
    assert [RSO.inner_step(s, 3, 0) for s in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    assert [RSO.inner_step(s, 4, 3) for s in range(6)] == [1, 1, 2, 3, 4, 1]  # staggered phase


def test_unwrap_gives_plain_linears_with_the_same_function():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "rso", rank=4, lr=1e-2)
    train(model, opt, 2)
    ids = batch()
    with torch.no_grad():
        before = model(ids)
        unwrap(model)
        after = model(ids)
    assert not subspace_linears(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("saved_layout,resumed_layout", [("partitioned", "partitioned"), ("replicated", "replicated"),
                                                          ("partitioned", "replicated"), ("replicated", "partitioned")])
def test_resume_is_bit_identical(saved_layout, resumed_layout):
    # P is in the model's state dict under either layout, so a checkpoint resumes under the other.
    hparams = dict(lr=1e-2, rank=4, update_proj_gap=3)
    model = tiny_model()
    opt = distopt.build_optimizer(model, "rso", state_layout=saved_layout, **hparams)
    train(model, opt, 7)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    train(model, opt, 6, data_seed=50)

    resumed = tiny_model(seed=123)
    opt2 = distopt.build_optimizer(resumed, "rso", state_layout=resumed_layout, **hparams)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 6, data_seed=50)
    final, final2 = model.state_dict(), resumed.state_dict()
    assert final.keys() == final2.keys()
    for n in final:
        assert torch.equal(final[n], final2[n]), n
    for a, b in zip(subspace_linears(model), subspace_linears(resumed)):
        assert torch.equal(a.rso_p, b.rso_p)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=2.5), "rank=2.5"),
        (dict(projection="sparse"), "projection='sparse'"),
        (dict(scale=0.0), "scale=0.0"),
        (dict(scale=math.nan), "scale=nan"),
        (dict(prox=-1.0), "prox=-1.0"),
        (dict(update_proj_gap=0), "update_proj_gap=0"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(betas=(0.9, 1.5)), "betas"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        distopt.build_optimizer(model, "rso", **kwargs)
    assert not subspace_linears(model)  # refused before the model was changed


def test_reparametrize_first_then_build_is_the_same_run():
    hparams = dict(lr=1e-2, rank=4, update_proj_gap=2)
    plain = tiny_model()
    opt = distopt.build_optimizer(plain, "rso", **hparams)
    train(plain, opt, 5)
    first = reparametrize(tiny_model(), **hparams)  # what an FSDP2 user does before fully_shard
    layers = subspace_linears(first)
    opt2 = distopt.build_optimizer(first, "rso", **hparams)
    assert subspace_linears(first) == layers  # kept, not wrapped twice
    train(first, opt2, 5)
    for (n, a), (m, b) in zip(plain.named_parameters(), first.named_parameters()):
        assert n == m and torch.equal(a, b), n


@pytest.mark.parametrize(
    "kwargs,match", [(dict(rank=3), "RSO here has rank 3"), (dict(rank=4, seed=1), r"\('haar', 1\.0, 1\)"),
                     (dict(rank=4, state_layout="replicated"), "same state_layout")]
)
def test_reparametrize_and_build_must_agree(kwargs, match):
    model = reparametrize(tiny_model(), rank=4)
    with pytest.raises(ValueError, match=match):
        distopt.build_optimizer(model, "rso", **kwargs)


# -- FSDP2 row shards -----------------------------------------------------------------------------
def _fsdp_case(rank, world, layout):
    from distributed.common import OddNet, local_batch, shard, train_steps
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    try:
        distopt.build_optimizer(shard(OddNet(), world), "rso", rank=5)
    except ValueError as err:
        out["refusal"] = str(err)
    model = shard(reparametrize(OddNet(), rank=5, state_layout=layout), world)
    opt = distopt.build_optimizer(model, "rso", rank=5, lr=1e-2, update_proj_gap=100, state_layout=layout)
    train_steps(model, opt, 2, rank, world)
    ids = local_batch(7, rank, world)
    with torch.no_grad():
        out["loss_before"] = model(ids).item()
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    expected = {opt.param_name(p): opt.owner(opt.param_name(p)).merged_weight().full_tensor() for p in group["params"]}
    out["shards"] = {opt.param_name(p): (tuple(local(p).shape), tuple(local(opt.owner(opt.param_name(p)).weight).shape))
                     for p in group["params"] if is_dtensor(p) and opt._views[p].sharded}
    out["proj_rows"] = {opt.param_name(p): (local(opt.owner(opt.param_name(p)).rso_p).shape[0],
                                            opt.owner(opt.param_name(p)).in_features) for p in group["params"]}
    held = opt.projections_in_model()
    out["held_bytes"] = sum(local(proj).numel() * local(proj).element_size() for proj in held.values())
    with CommDebugMode() as merging:
        for p in group["params"]:
            opt.merge(local(p), opt.state[p], group, opt._views[p], index=1)
    out["merge_collectives"] = merging.get_total_counts()
    out["merged"] = {name: torch.allclose(opt.owner(name).weight.full_tensor(), want, rtol=1e-5, atol=1e-6)
                     for name, want in expected.items()}
    out["fresh_proj"] = {opt.param_name(p): opt.owner(opt.param_name(p)).projection().clone() for p in group["params"]}
    with torch.no_grad():
        out["loss_after"] = model(ids).item()
    model(ids).backward()
    with CommDebugMode() as stepping:  # the detector does see collectives: a step's finiteness check
        opt.step()
    out["step_collectives"] = stepping.get_total_counts()
    return out


def _fsdp_worker(rank, world, init_file, out_dir, layout):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(_fsdp_case(rank, world, layout), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["partitioned", "replicated"])
def test_fsdp2_factor_rows_pair_with_weight_rows_and_the_merge_is_local(tmp_path, layout):
    """Two gloo ranks, FSDP2 Shard(0) with uneven rows (53 -> 27/26, 37 -> 19/18, 61 -> 31/30):
    each rank's rows of B^T pair with its rows of W, so the merge gives the rows of W + B^T P^T
    from this rank's rows and the whole P. Partitioned, each rank keeps ``ceil(in/2)`` or
    ``floor(in/2)`` rows of P and a merge all-gathers it once; replicated, P is whole and the merge
    issues no collective. Both layouts draw the same next P. Building on an already sharded model
    points at reparametrize."""
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), layout), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, res in enumerate(results):
        assert "reparametrize" in res["refusal"] and "before fully_shard" in res["refusal"]
        assert len(res["shards"]) == 10
        for factor_rows, weight_rows in res["shards"].values():
            assert factor_rows[0] == weight_rows[0] and factor_rows[1] == 5
        for rows, in_features in res["proj_rows"].values():
            expected = -(-in_features // 2) if r == 0 else in_features // 2
            assert rows == (expected if layout == "partitioned" else in_features)
        assert res["merge_collectives"] == (len(res["proj_rows"]) if layout == "partitioned" else 0)
        assert all(res["merged"].values()), res["merged"]
        assert math.isclose(res["loss_after"], res["loss_before"], rel_tol=1e-5)
        assert res["step_collectives"] > 0
        for name, proj in res["fresh_proj"].items():  # every rank holds its part of the same next P
            torch.testing.assert_close(proj, results[0]["fresh_proj"][name], rtol=0, atol=0)
    in_r = sum(5 * in_features for _, in_features in results[0]["proj_rows"].values())
    # Partitioned, the ranks' parts of P add up to one whole P (fp32 here); replicated, each holds it whole.
    assert sum(res["held_bytes"] for res in results) == 4 * in_r * (1 if layout == "partitioned" else 2)


def test_inner_problem_is_torch_adamw_on_b_and_w_only_decays():
    # Between merges, B (stored as rso_b) takes torch.optim.AdamW's steps on its own gradient, with
    # bias corrections counted from the last merge; the frozen W only decays.
    model = tiny_model()
    lr, wd, tau = 1e-2, 0.1, 5
    opt = distopt.build_optimizer(model, "rso", rank=4, lr=lr, weight_decay=wd, update_proj_gap=tau, stagger=False)
    layers = subspace_linears(model)
    w0 = [layer.weight.detach().clone() for layer in layers]
    refs, adamws = [], []
    for step in range(2 * tau):
        if step % tau == 0:  # a fresh inner problem: B = 0, fresh moments
            refs = [nn.Parameter(layer.rso_b.detach().clone()) for layer in layers]
            adamws = [torch.optim.AdamW([r], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd) for r in refs]
        ids = batch(seed=step)
        model(ids, ids).backward()
        for layer, ref in zip(layers, refs):
            ref.grad = layer.rso_b.grad.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for adamw in adamws:
            adamw.step()
        if (step + 1) % tau:  # before a merge, which folds B into W and zeroes it
            for layer, ref in zip(layers, refs):
                torch.testing.assert_close(layer.rso_b.detach(), ref.detach(), rtol=1e-5, atol=1e-8)
        if step < tau - 1:
            for layer, w in zip(layers, w0):
                torch.testing.assert_close(layer.weight, w * (1 - lr * wd) ** (step + 1), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("hparams", [{}, {"weight_decay": 0.1}, {"prox": 0.5}, {"prox": 0.5, "weight_decay": 0.1}])
def test_fused_inner_steps_equal_the_one_by_one_steps(monkeypatch, hparams):
    # Staggered merges: the factors' inner counts differ on most steps, and some merge on each step.
    def run(fused: bool):
        model = tiny_model()
        opt = distopt.build_optimizer(model, "rso", rank=4, lr=1e-2, update_proj_gap=3, **hparams)
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(RSO, "_fused_plan", lambda self, group, params: ([], list(params)))
            for step in range(7):  # the same gradients for both, so only the kernel's rounding differs
                set_grads([p for p in model.parameters() if p.requires_grad], seed=step)
                opt.step()
        return model, opt

    (fused, fused_opt), (single, single_opt) = run(True), run(False)
    factors = [n for n in fused_opt._names.values() if n.endswith("rso_b")]
    assert len({refresh_phase(n, 3, True) for n in factors}) == 3  # the staggering this test relies on
    for (name, a), b in zip(fused.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(fused_opt.state_dict()["state"].values(), single_opt.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-9)


def test_a_plain_inner_step_dispatches_the_same_ops_for_any_number_of_layers():
    def ops(layers: int) -> int:
        torch.manual_seed(0)
        model = TinyLlama(LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                     num_attention_heads=4))
        opt = distopt.build_optimizer(model, "rso", rank=4, update_proj_gap=100, stagger=False, weight_decay=0.1)
        set_grads(model.parameters(), seed=0)
        opt.step()
        with op_counter() as counter:
            opt.step()
        return counter.count

    assert ops(2) == ops(8)  # 14 factors more would show as one op each or more


def test_a_strided_factor_steps_as_a_dense_one_and_leaves_its_neighbours_alone():
    """torch's fused kernel walks each tensor as one dense block: a factor re-pointed to a strided view
    (every other column of a wider tensor) after the first step, when the step's plan is made and
    kept, takes the one-by-one step, and the columns between stay."""
    models = [tiny_model(), tiny_model()]
    opts = [distopt.build_optimizer(m, "rso", rank=4, lr=1e-2, update_proj_gap=100) for m in models]
    for step in range(4):
        if step == 1:
            factor = subspace_linears(models[1])[0].rso_b
            host = torch.full((factor.shape[0], 2 * factor.shape[1]), 7.0)
            host[:, ::2] = factor.detach()
            factor.data = host[:, ::2]
            assert not factor.is_contiguous()
        for model, opt in zip(models, opts):
            set_grads([p for p in model.parameters() if p.requires_grad], seed=step)
            opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.equal(host[:, 1::2], torch.full_like(host[:, 1::2], 7.0))


def test_a_device_without_the_fused_kernel_steps_its_factors_one_by_one(monkeypatch):
    from distopt.core import batching

    def run(missing_kernel: bool):
        model = tiny_model()
        opt = distopt.build_optimizer(model, "rso", rank=4, lr=1e-2, update_proj_gap=3, weight_decay=0.1)
        with monkeypatch.context() as patch:
            if missing_kernel:
                patch.setattr(batching, "_no_fused_adam", {"cpu"})
            else:
                patch.setattr(RSO, "_fused_plan", lambda self, group, params: ([], list(params)))
            for step in range(4):
                set_grads([p for p in model.parameters() if p.requires_grad], seed=step)
                opt.step()
        return model

    for (n, a), b in zip(run(True).named_parameters(), run(False).parameters()):
        assert torch.equal(a, b), n
