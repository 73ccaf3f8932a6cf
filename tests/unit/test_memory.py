"""distopt.memory: the optimizer-state part is exact, the rest follows DeepSpeed's and the ZeRO paper's accounting."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import batch, tiny_model

import distopt
from distopt import memory
from distopt.optim import REGISTRY

GIB = 1024**3


def _small_hparams(name: str) -> dict:
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return {"rank": 8} if "rank" in params else {}


@pytest.mark.parametrize("name", distopt.list_optimizers())
def test_state_part_equals_measured_state_bytes(name):
    """On one rank, optimizer state + projectors == distopt.state_bytes of a real optimizer after steps."""
    hparams = _small_hparams(name)
    model = tiny_model()
    estimate = memory.estimate(model, name, "ddp", 1, "fp32", hparams=hparams)
    optimizer = distopt.build_optimizer(model, name, **hparams)
    for step in range(3):
        ids = batch(seed=step)
        model(ids, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert estimate.optimizer_state + estimate.projectors == distopt.state_bytes(optimizer)
    # Weights and gradients of the model as trained (RSO adds factors, freezes W and keeps P in the
    # model, counted as the optimizer's projectors above).
    held = {id(t) for t in getattr(optimizer, "projections_in_model", dict)().values()}
    weights = [p for p in model.parameters() if id(p) not in held]
    assert estimate.weights == 4 * sum(p.numel() for p in weights)
    assert estimate.gradients == 4 * sum(p.numel() for p in weights if p.requires_grad)
    if name != "rso":
        assert estimate.weights == estimate.gradients == 4 * sum(p.numel() for p in tiny_model().parameters())


def test_meta_device_build_matches_a_real_one():
    with torch.device("meta"):
        meta = tiny_model()
    real = tiny_model()
    for name in ("adamw", "galore"):
        a = memory.state_layout(meta, name, _small_hparams(name))
        b = memory.state_layout(real, name, _small_hparams(name))
        assert [(s.name, s.state_bytes, s.projector_bytes) for s in a] == [(s.name, s.state_bytes, s.projector_bytes) for s in b]
    assert all(p.device.type == "meta" for p in meta.parameters())  # the caller's model is left alone


def test_galore_projectors_are_its_bases():
    layout = {s.name: s for s in memory.state_layout(tiny_model(), "galore", {"rank": 8})}
    q = layout["model.layers.0.self_attn.q_proj.weight"]  # 48 x 48, right basis 48 x 8, moments 48 x 8
    assert q.projector_bytes == 4 * 48 * 8
    assert q.state_bytes == 8 + 2 * 4 * 48 * 8
    assert layout["model.embed_tokens.weight"].projector_bytes == 0


def test_fsdp2_row_shards_follow_the_shard_view():
    """Two ranks, rank 0 holds the first ceil(m/2) rows. Partitioned (the default): a right basis
    (n x r) keeps ceil(n/2) rows and the moments (rows x r) are split; a left basis (rows x r) is split
    and the moments (r x n) keep ceil(n/2) columns. Replicated: the right basis and the left moments whole."""
    full = {s.name: s for s in memory.state_layout(tiny_model(), "galore", {"rank": 8})}
    half = {s.name: s for s in memory.state_layout(tiny_model(), "galore", {"rank": 8}, shard_ranks=2)}
    whole = {s.name: s for s in memory.state_layout(tiny_model(), "galore", {"rank": 8, "state_layout": "replicated"},
                                                   shard_ranks=2)}
    up = "model.layers.0.mlp.up_proj.weight"  # 80 x 48: right side
    down = "model.layers.0.mlp.down_proj.weight"  # 48 x 80: left side
    assert (full[up].projector_bytes, half[up].projector_bytes, whole[up].projector_bytes) == (4 * 48 * 8, 4 * 24 * 8, 4 * 48 * 8)
    assert half[up].state_bytes == whole[up].state_bytes == 8 + 2 * 4 * 40 * 8
    assert (full[down].projector_bytes, half[down].projector_bytes) == (4 * 48 * 8, 4 * 24 * 8)
    assert whole[down].projector_bytes == 4 * 24 * 8
    assert full[down].state_bytes == whole[down].state_bytes == 8 + 2 * 4 * 8 * 80
    assert half[down].state_bytes == 8 + 2 * 4 * 8 * 40
    emb = "model.embed_tokens.weight"  # 96 x 48, element-wise: rows split
    assert half[emb].state_bytes == 4 + 2 * 4 * 48 * 48


def test_zero_stages_match_deepspeed_and_the_zero_paper_for_adamw():
    model = tiny_model()
    p = sum(x.numel() for x in model.parameters())
    steps = 4 * len(list(model.parameters()))  # AdamW keeps an fp32 step counter per tensor on every rank
    n = 4
    largest = memory.largest_unit_params(model)
    z1 = memory.estimate(model, "adamw", "zero1", n, "bf16-mixed")
    z2 = memory.estimate(model, "adamw", "zero2", n, "bf16-mixed")
    z3 = memory.estimate(model, "adamw", "zero3", n, "bf16-mixed")
    # ZeRO-1 is DeepSpeed's estimate_zero2_model_states_mem_needs (4P + 16P/N), step counters aside.
    assert abs(z1.total - memory.deepspeed_reference("zero1", p, n)) <= steps + 4
    # ZeRO-2 keeps only its gradient partition: 2P + 18P/N.
    assert abs(z2.total - (2 * p + 18 * p / n)) <= steps + 4
    # ZeRO-3: 20P/N + two gathered bf16 units; DeepSpeed prints 18P/N + 4L (no bf16 gradient partition).
    assert abs(z3.total - (20 * p / n + 4 * largest)) <= steps + 4
    assert abs((z3.total - 2 * p / n) - memory.deepspeed_reference("zero3", p, n, largest)) <= steps + 4
    ddp = memory.estimate(model, "adamw", "ddp", n, "fp32")
    assert ddp.total == 4 * p + 4 * p + 8 * p + steps


def test_hsdp_shards_within_a_replica_group():
    model = tiny_model()
    hsdp = memory.estimate(model, "galore", "hsdp", 8, "fp32", hparams={"rank": 8}, hsdp_replicas=2)
    fsdp4 = memory.estimate(model, "galore", "fsdp2", 4, "fp32", hparams={"rank": 8})
    assert (hsdp.weights, hsdp.optimizer_state, hsdp.projectors) == (fsdp4.weights, fsdp4.optimizer_state, fsdp4.projectors)
    with pytest.raises(ValueError, match="must divide"):
        memory.estimate(model, "galore", "hsdp", 8, "fp32", hparams={"rank": 8}, hsdp_replicas=3)


def test_llama_7b_on_one_and_eight_80gb_gpus():
    """The question the estimator answers: what fits for LLaMA-7B (GaLore paper shapes)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    capacity = 80 * GIB

    def fits(opt, engine, world, precision, **hp):
        return memory.estimate(model, opt, engine, world, precision, hparams=hp).fits(capacity)

    # One GPU: AdamW does not fit even in pure bf16 (2 + 2 + 8 bytes per parameter); GaLore at the
    # paper's rank 1024 does.
    assert not fits("adamw", "ddp", 1, "bf16")
    assert fits("galore", "ddp", 1, "bf16", rank=1024)
    # Eight GPUs: replicated AdamW still does not fit; sharding it does.
    assert not fits("adamw", "ddp", 8, "bf16-mixed")
    for engine in ("fsdp2", "zero2", "zero3"):
        assert fits("adamw", engine, 8, "bf16-mixed"), engine
    galore = memory.estimate(model, "galore", "ddp", 1, "bf16", hparams={"rank": 1024})
    adamw = memory.estimate(model, "adamw", "ddp", 1, "bf16")
    assert galore.optimizer_state + galore.projectors < 0.4 * adamw.optimizer_state
