"""Shared pieces of the test suite: a tiny model, a fixed batch, training and round-trip loops."""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
from pathlib import Path

import torch

import distopt
from distopt.models import LlamaShape, TinyLlama

TINY = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)


def tiny_model(seed: int = 0, shape: LlamaShape = TINY) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(shape)


def batch(seed: int = 1, size: int = 8, seq: int = 24, vocab: int = TINY.vocab_size) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A learnable signal: each sequence repeats a short random motif.
    motif = torch.randint(0, vocab, (size, 6), generator=g)
    return motif.repeat(1, seq // 6 + 1)[:, :seq]


def train(model, optimizer, steps: int, data_seed: int = 1) -> list[float]:
    losses = []
    for step in range(steps):
        ids = batch(seed=data_seed + step % 4)
        loss = model(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def roundtrip(state_dict: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_resume_bit_identical(name: str, steps_before: int = 7, steps_after: int = 6, **hparams) -> None:
    """Save after ``steps_before``, load into a fresh optimizer and model, continue: every parameter
    must equal the uninterrupted run bit for bit."""
    model = tiny_model()
    opt = distopt.build_optimizer(model, name, **hparams)
    train(model, opt, steps_before)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    train(model, opt, steps_after, data_seed=50)

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = distopt.build_optimizer(resumed, name, **hparams)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, steps_after, data_seed=50)
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


def side_by_side(pairs, steps: int):
    """Train ``(model, optimizer)`` pairs on the same batches (``batch(seed=step)``), yielding each
    step's index after every pair has stepped, for the caller to compare them (oracle tests)."""
    for step in range(steps):
        ids = batch(seed=step)
        for model, _ in pairs:
            model(ids, ids).backward()
        for _, opt in pairs:
            opt.step()
        for model, _ in pairs:
            model.zero_grad()
        yield step


@functools.cache
def _benchmarks_common():
    """``benchmarks/common.py``, loaded by path (the distributed tests' own ``common`` module has the
    same name), so that the tests measure as the benchmarks do."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("distopt_benchmarks_common", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def op_counter():
    """``benchmarks/common.py``'s ``OpCounter``: aten ops counted as the benchmarks count them."""
    return _benchmarks_common().OpCounter()


def peak_tensor_bytes(fn) -> int:
    """``benchmarks/common.py``'s ``peak_tensor_bytes``: the most tensor bytes ``fn()`` held at once."""
    return _benchmarks_common().peak_tensor_bytes(fn)


def as_on_a_gpu():
    """``benchmarks/common.py``'s ``as_on_a_gpu``: within it, the step runs as on a GPU (each op
    allocates its result; step() checks every gradient)."""
    return _benchmarks_common().as_on_a_gpu()
