"""The batched step of the projected-Adam family equals its per-matrix step, and takes what it can."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
from pathlib import Path

import pytest
import torch
from helpers import as_on_a_gpu, batch, op_counter, peak_tensor_bytes, roundtrip, set_grads, tiny_model, train

import distopt
from distopt.core import batching
from distopt.models import LlamaShape, TinyLlama
from distopt.optim import REGISTRY
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


# Without torch's fused Adam kernel (a device that lacks it) the batch math takes the eager ops.
EAGER_CASES = [(name, {**hparams, "_eager": True}) for name, hparams in CASES[:3] + CASES[5:6]]  # [5]: Fira's term


@pytest.mark.parametrize("name,hparams", CASES + EAGER_CASES)
def test_batched_step_equals_the_per_matrix_step(name, hparams, monkeypatch):
    """From the same state and gradients, one step each way: after 0 to 8 steps of training (gap 3,
    staggered, so every step refreshes some matrices), weights and every state tensor agree to the
    rounding of the batched products."""
    hparams = dict(hparams)
    eager = hparams.pop("_eager", False)
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
        if eager:
            monkeypatch.setattr(batching, "_no_fused_adam", {"cpu"})
        calls = _spy(monkeypatch, batched=True)
        opt.step()
        assert calls == [matrices], step  # every matrix took the batched path
        for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
            # A batched product rounds unlike one matrix's (oneDNN, cuBLAS), and Adam's normalization
            # magnifies that in entries of R below eps: 1e-6 is 2e-4 of the step (lr 1e-2), far below
            # any wrong term (a bias correction, the decay, a side).
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=n, step=step: f"step {step} {n}: {m}")
            for key, value in opt.state[a].items():
                torch.testing.assert_close(value, twin.state[b][key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m, key=key, step=step: f"step {step} {key}: {m}")
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name,hparams", [CASES[0], CASES[1], CASES[5], CASES[9], EAGER_CASES[0]])
def test_the_step_as_a_gpu_runs_it_gives_the_cpu_path_numbers_bit_for_bit(name, hparams, monkeypatch):
    """The allocation path a GPU takes (each op allocates its result; the fused Adam kernel writes into a
    fresh zeroed tensor) against the CPU's kept buffers: the same kernels, so the same bits, over steps
    that refresh (gap 3, staggered), with Fira's term, bf16 bases and the eager math."""
    hparams = dict(hparams)
    eager = hparams.pop("_eager", False)
    models = [tiny_model(), tiny_model()]
    opts = [distopt.build_optimizer(m, name, lr=1e-2, rank=6, update_proj_gap=3, **hparams) for m in models]
    if eager:
        monkeypatch.setattr(batching, "_no_fused_adam", {"cpu"})
    for step in range(7):
        for index, (model, opt) in enumerate(zip(models, opts)):
            set_grads(model.parameters(), seed=step)
            with as_on_a_gpu() if index else contextlib.nullcontext():
                opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n
        for key, value in opts[0].state[a].items():
            assert torch.equal(value, opts[1].state[b][key]), (n, key)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), tiny_model().parameters()))


def test_a_state_tensor_replaced_between_steps_is_read_from_its_new_tensor():
    """A re-allocated basis (a new tensor in the state dict, the old one overwritten) re-packs the
    batch: nothing kept from the old buffer (its transposed view, say) is read again."""
    models = [tiny_model(), tiny_model()]
    opts = [distopt.build_optimizer(m, "galore", lr=1e-2, rank=6, update_proj_gap=100, side="left") for m in models]
    for model, opt in zip(models, opts):
        train(model, opt, 2)
    replaced = opts[0]
    for group in replaced.param_groups:
        if group["kind"] == "matrix":
            for p in group["params"]:
                fresh = replaced.state[p]["basis"].clone()
                replaced.state[p]["basis"].zero_()  # the old buffer: whatever still reads it goes wrong
                replaced.state[p]["basis"] = fresh
    for model, opt in zip(models, opts):
        train(model, opt, 1, data_seed=9)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_a_step_at_learning_rate_zero_leaves_fira_batches_finite_and_unmoved():
    """A warmup from lr 0: the fused pass's scaled direction is 0 and cannot give back the unscaled
    one that Fira's ratio needs, so that step takes the eager ops; nothing moves, nothing is NaN."""
    model = tiny_model()
    opt = distopt.build_optimizer(model, "grassjump", lr=1e-2, rank=6, update_proj_gap=100)
    train(model, opt, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group["lr"] = 0.0
    train(model, opt, 1, data_seed=7)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(torch.isfinite(v).all() for state in opt.state.values() for v in state.values())


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


def test_a_batch_with_a_non_finite_gradient_steps_its_other_members_as_the_per_matrix_path_does(monkeypatch):
    """A batch checks its own stacked gradients (CPU): a NaN in one member skips that member alone, its
    refresh included, and the others step one by one; an element-wise parameter skipped in the same
    step leaves the batch's members to their batch."""
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=6, update_proj_gap=3)
    train(model, opt, 2)  # the next step refreshes a third of the matrices (staggered)
    twin_model = tiny_model(seed=1)
    twin_model.load_state_dict(model.state_dict())
    twin = distopt.build_optimizer(twin_model, "galore", lr=1e-2, rank=6, update_proj_gap=3)
    twin.load_state_dict(roundtrip(opt.state_dict()))
    set_grads(model.parameters(), seed=5)
    bad = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"}
    for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
        if n in bad:
            a.grad[1, 2] = float("nan")
        b.grad = a.grad.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    monkeypatch.setattr(ProjectedAdam, "_batchable", lambda self, p, g: False)
    twin.step()
    assert opt.nonfinite_skips == twin.nonfinite_skips == dict.fromkeys(bad, 1)
    for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
        if n in bad:
            assert torch.equal(a, before[n]), n
        else:
            assert not torch.equal(a, before[n]), n
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        for key, value in opt.state[a].items():
            torch.testing.assert_close(value, twin.state[b][key], rtol=1e-6, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")


def test_batched_step_holds_at_most_coalesce_bytes_of_batched_tensors(monkeypatch):
    """The stacked gradients, R and N of at most ``coalesce_bytes`` worth of matrices are alive at once;
    chunking changes only the rounding of the batched products."""
    results = []
    for limit in (None, 1, 60_000):
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
    for a, b, c in zip(whole, single, some):  # 4 steps of that rounding: 1e-3 of a step at lr 1e-2
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


def test_a_checkpoint_written_before_packed_state_loads_and_trains_on():
    """``tests/fixtures/galore_state_cbac32c.pt`` holds a state whose tensors are separate (written
    before the batched step packed them): it loads, the step packs it, and 3 more steps give the
    weights the old code gave, to the rounding of the batched products."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    spec = importlib.util.spec_from_file_location("make_step_fixture", fixtures / "make_step_fixture.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    saved = torch.load(fixtures / "galore_state_cbac32c.pt", weights_only=True)
    model, opt = maker.build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, 3, data_seed=50)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["after"][name], rtol=1e-5, atol=1e-5, msg=name)
    # The same-shape matrices' moments are slices of one buffer now, and save as they loaded.
    q = [opt.state[p] for p in opt.param_groups[-1]["params"] if opt.param_name(p).endswith("q_proj.weight")]
    assert len(q) == 2 and q[0]["exp_avg"]._base is not None and q[0]["exp_avg"]._base is q[1]["exp_avg"]._base
    again = roundtrip(opt.state_dict())
    assert again["state"].keys() == saved["optimizer"]["state"].keys()
    assert all(torch.equal(again["state"][n][k], v) for n, s in opt.state_dict()["state"].items() for k, v in s.items())


def test_packed_state_saves_each_tensor_once():
    """``torch.save`` of the state dict writes a packed buffer once, not once per slice."""
    model = tiny_model()
    opt = distopt.build_optimizer(model, "galore", lr=1e-2, rank=6, update_proj_gap=3)
    train(model, opt, 2)
    tensors = [v for s in opt.state_dict()["state"].values() for v in s.values()]
    assert any(t._base is not None for t in tensors)  # packed
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert buffer.tell() < 1.1 * sum(t.numel() * t.element_size() for t in tensors) + 200_000


def test_packed_state_is_one_buffer_that_follows_a_replaced_tensor():
    """``core.batching``: the first use packs the slices into one buffer (values kept), later uses
    return it without a copy, a replaced tensor is packed again, and tensors packed with other
    companions come back as a copy that ``store_back`` writes through."""
    from distopt.core import batching

    states = [{"m": torch.full((2, 3), float(i))} for i in range(3)]
    packing = batching.PackedState(states)
    buffer, copied = packing.get("m")
    assert not copied and buffer.shape == (3, 2, 3) and [s["m"]._base is buffer for s in states] == [True] * 3
    assert torch.equal(buffer[:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    buffer.add_(1)  # in place: the state dicts see it
    assert torch.equal(states[2]["m"], torch.full((2, 3), 3.0))
    again, copied = packing.get("m")
    assert again is buffer and not copied
    states[1]["m"] = torch.zeros(2, 3)  # a load that replaced a tensor
    repacked, copied = packing.get("m")
    assert copied  # slices 0 and 2 still live in the old buffer: a copy, not a second buffer
    repacked.add_(5)
    packing.store_back("m", repacked)
    assert torch.equal(states[1]["m"], torch.full((2, 3), 5.0)) and torch.equal(states[0]["m"], torch.full((2, 3), 6.0))
    assert batching.shared_buffer([states[0]["m"], states[2]["m"]]) is None  # not slices 0..1 of their buffer
    assert batching.shared_buffer([s["m"] for s in [states[0]]]) is None


@pytest.mark.slow
def test_compile_fuses_the_batch_math_and_gives_the_eager_numbers():
    """``compile=True``: the batched step's element-wise Adam runs as compiled graphs (counted by
    dynamo), over steps whose bias corrections differ per matrix (staggered resets), with the eager
    step's weights and moments up to the fused kernel's rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    models, opts = {}, {}
    for compiled in (False, True):
        models[compiled] = tiny_model()
        opts[compiled] = distopt.build_optimizer(models[compiled], "galore", lr=1e-2, rank=6, update_proj_gap=3,
                                                 moment_policy="reset", compile=compiled)
        train(models[compiled], opts[compiled], 5)
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["frames"].values()) >= 1
    # The fused kernel rounds unlike the eager ops (~1 ulp), and the refreshes at steps 3 and 4
    # carry that into the bases and moments: 1e-5 is far below a wrong bias correction or beta.
    for a, b in zip(models[False].parameters(), models[True].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for key, value in opts[False].state[a].items():
            torch.testing.assert_close(value, opts[True].state[b][key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    with pytest.raises(ValueError, match="compile='yes': must be True or False"):
        distopt.build_optimizer(tiny_model(), "galore", compile="yes")


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_strided_parameters_step_as_dense_ones_and_leave_their_neighbours_alone(name):
    """torch's fused CPU kernels (AdamW's, and the SGD kernel the batched update adds with) walk each
    tensor as one dense block. A parameter that is a strided view (every other column of a wider
    tensor) must step as its dense copy does, and the columns between must stay as they were."""
    dense_model, strided_model = tiny_model(), tiny_model()
    wide = {}
    for n, p in strided_model.named_parameters():
        if n.endswith(("q_proj.weight", "input_layernorm.weight")):
            host = torch.full((*p.shape[:-1], 2 * p.shape[-1]), 7.0)
            host[..., ::2] = p.detach()
            p.data = host[..., ::2]  # not contiguous
            wide[n] = host
    assert wide and not any(p.is_contiguous() for n, p in strided_model.named_parameters() if n in wide)
    hparams = {} if name == "adamw" else {"rank": 6, "update_proj_gap": 3}
    dense = distopt.build_optimizer(dense_model, name, lr=1e-2, **hparams)
    strided = distopt.build_optimizer(strided_model, name, lr=1e-2, **hparams)
    for step in range(4):
        for model in (dense_model, strided_model):
            set_grads(model.parameters(), seed=step)
        dense.step()
        strided.step()
    for (n, a), b in zip(dense_model.named_parameters(), strided_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for n, host in wide.items():
        assert torch.equal(host[..., 1::2], torch.full_like(host[..., 1::2], 7.0)), n


def _plain_step_ops(name: str, layers: int) -> int:
    torch.manual_seed(0)
    model = TinyLlama(LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                 num_attention_heads=4))
    accepted = inspect.signature(REGISTRY[name].__init__).parameters
    opt = distopt.build_optimizer(model, name, **{k: v for k, v in dict(rank=4, update_proj_gap=100).items() if k in accepted})
    set_grads(model.parameters(), seed=0)
    for _ in range(2):  # the first bases, then a plain step that packs the state
        opt.step()
    with op_counter() as ops:
        opt.step()
    return ops.count


# One process: batched by shape, Fira's residual (GrassJump, GrassWalk and SubTrack by default) included.
# SAM, AdaPM and AdaPM-mini batched by shape too (their tests of the numbers are in their files; RSO's, all of it).
@pytest.mark.parametrize("name", ["galore", "golore", "grassjump", "grasswalk", "subtrack", "snsm", "adam-mini", "adamw", "sam",
                                  "adapm", "adapm-mini"])
@pytest.mark.parametrize("gpu_way", [False, True])
def test_a_plain_step_dispatches_ops_per_batch_not_per_matrix(name, gpu_way):
    """2 or 8 layers give the same batches (one per shape), so the same aten ops: views, slices and
    per-tensor adds per matrix would show up as a difference (4 matrices of each shape more). Also as
    a GPU runs the step (temporaries allocated by their ops)."""
    with as_on_a_gpu() if gpu_way else contextlib.nullcontext():
        assert _plain_step_ops(name, 2) == _plain_step_ops(name, 8)


def test_stacked_reads_tensors_back_to_back_in_one_storage_without_a_copy_and_copies_anything_else():
    whole = torch.arange(5 * 3 * 3, dtype=torch.float32).reshape(5, 3, 3).clone()  # a buffer, not a view
    rows = whole.unbind(0)
    flat = torch.arange(2 + 5 * 9, dtype=torch.float32)  # rows of a view of a flat buffer: their _base is flat
    viewed = flat[2:].view(5, 3, 3).unbind(0)
    for tensors, picked in ((rows, [0, 1, 2, 3, 4]), (rows, [1, 2, 3]), (viewed, [0, 1, 2, 3, 4]), (viewed, [2, 3]),
                            (viewed, [4])):
        got = batching.stacked([tensors[i] for i in picked])
        assert got.data_ptr() == tensors[picked[0]].data_ptr()
        assert torch.equal(got, torch.stack([tensors[i] for i in picked]))
    # Anything that only looks like rows of one buffer is stacked: a gap, a reversed order, transposed
    # squares, rows of a column slice.
    for tensors in ([rows[0], rows[2]], [rows[1], rows[0]], [r.T for r in rows], [viewed[3], viewed[1]],
                    list(whole[:, :, :2].unbind(0))):
        got = batching.stacked(tensors)
        assert got.data_ptr() not in (whole.data_ptr(), flat.data_ptr()) and torch.equal(got, torch.stack(tensors))


@pytest.mark.parametrize("name,hparams,packed", [
    ("galore", {}, False),
    ("galore", {"side": "left"}, False),
    ("galore", {}, True),
    ("galore", {"basis_dtype": "bf16"}, False),
    ("grassjump", {}, False),  # Fira's term
    ("galore", {"compile": True, "weight_decay": 0.1}, False),
])
def test_a_plain_step_as_a_gpu_runs_it_holds_at_most_coalesce_bytes_of_temporaries(name, hparams, packed):
    """Each op allocating its result (a GPU's way), the step's temporaries peak under
    ``coalesce_bytes``: a batch's update goes into its stacked gradients' buffer and its direction
    over its ``R``, not into buffers of their own (which had it at 1.7-1.9x). Measured as the tensor
    bytes alive after each op."""
    for limit in (4_000_000, 12_000_000):  # 3-4 and 9-12 matrices a batch
        torch.manual_seed(0)
        model = TinyLlama(LlamaShape(vocab_size=64, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=4))
        if packed:
            distopt.pack_weights(model)
        opt = distopt.build_optimizer(model, name, lr=1e-3, rank=32, update_proj_gap=1000, **hparams)
        opt.coalesce_bytes = limit
        set_grads(model.parameters(), seed=0)
        with as_on_a_gpu():
            for _ in range(2):  # the first bases, then a plain step that packs the state
                opt.step()
            peak = peak_tensor_bytes(opt.step)
        assert limit / 2 < peak <= limit, (limit, peak)


def test_directions_written_over_r_equal_the_fused_kernels_and_a_kernel_that_writes_first_is_refused(monkeypatch):
    """The direction written over ``R`` (one kernel, parameter and gradient the same tensor) gives
    what the fused Adam kernel writes into a zeroed tensor scaled by the step, bit for bit, moments
    included; a kernel that wrote a parameter before reading its gradient fails the probe, and the
    caller is told (nothing written)."""
    generator = torch.Generator().manual_seed(0)
    lows = torch.randn(3, 8, 40, generator=generator)
    avgs, avg_sqs = torch.randn(3, 8, 40, generator=generator) * 0.1, torch.rand(3, 8, 40, generator=generator) * 0.01
    counts = [torch.tensor(4.0)]
    expected = torch.zeros_like(lows)
    moments = avgs.clone(), avg_sqs.clone()
    assert batching.scaled_adam_directions([moments[0]], [moments[1]], [lows.clone()], [expected], counts, 1.0, 0.9,
                                           0.999, 1e-8)
    monkeypatch.setattr(batching, "_in_place_adam", {})
    assert batching.adam_directions_in_place([avgs], [avg_sqs], [lows], counts, 0.9, 0.999, 1e-8)
    assert torch.equal(lows, expected) and torch.equal(avgs, moments[0]) and torch.equal(avg_sqs, moments[1])
    assert lows.abs().min() > 0

    real = torch._fused_adamw_

    def writes_first(params, grads, *args, **kwargs):  # zeroes each parameter, then reads the gradients
        for p in params:
            p.mul_(1.0 - kwargs["lr"] * kwargs["weight_decay"])
        real(params, grads, *args, **kwargs)

    monkeypatch.setattr(batching, "_in_place_adam", {})
    monkeypatch.setattr(torch, "_fused_adamw_", writes_first)
    before = lows.clone(), avgs.clone()
    assert not batching.adam_directions_in_place([avgs], [avg_sqs], [lows], counts, 0.9, 0.999, 1e-8)
    assert torch.equal(lows, before[0]) and torch.equal(avgs, before[1])
    assert batching._in_place_adam == {"cpu": False}
