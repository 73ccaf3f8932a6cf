"""Adam-mini: one second moment per head or row, parity with the adam-mini package, state, checkpoints."""

import copy

import pytest
import torch
from helpers import TINY, set_grads, side_by_side, tiny_model, train
from optim_checks import (  # noqa: F401 (a fixture, used by name)
    assert_matrix_group_trains,
    assert_refused,
    assert_routed_matrices_step_as_per_matrix,
    assert_state_bytes_match,
    matrix_group,
    one_thread,
)
from torch import nn

import distopt
from distopt.core import blocks
from distopt.core.shard import MatrixShardView
from distopt.models import LlamaShape, TinyLlama

GQA = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_second_moment_per_head_or_row():
    torch.manual_seed(0)
    model = TinyLlama(GQA)
    opt = distopt.build_optimizer(model, "adam-mini", betas=(0.9, 0.99))
    group = matrix_group(opt)
    assert (group["n_heads"], group["n_kv_heads"]) == (4, 2)  # read from the model
    set_grads(list(model.parameters()), 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    blocks_per_name = {"q_proj": 4, "k_proj": 2, "v_proj": 24, "o_proj": 48, "gate_proj": 80, "up_proj": 80,
                       "down_proj": 48, "embed_tokens": 96, "lm_head": 96}
    by_name = dict(model.named_parameters())
    for name in group["param_names"]:
        key = next(k for k in blocks_per_name if k in name)
        v = opt.state[by_name[name]]["exp_avg_sq"]
        assert v.shape == (blocks_per_name[key],), name
        g = grads[name]
        means = g.square().reshape(blocks_per_name[key], -1).mean(dim=1)  # blocks are whole rows
        torch.testing.assert_close(v, 0.01 * means, rtol=1e-6, atol=0)
        assert opt.state[by_name[name]]["exp_avg"].shape == g.shape
    others = [n for g in opt.param_groups if g["kind"] == "adamw" for n in g["param_names"]]
    assert others and all("norm" in n for n in others)


def test_matches_the_adam_mini_package():
    """adam-mini 1.1.1 is the oracle. Its rules coincide with ours except for norm weights (one v per
    tensor there, element-wise here), so they are frozen in both models."""
    Adam_mini = pytest.importorskip("adam_mini").Adam_mini
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)
    ref_model = copy.deepcopy(model)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = distopt.build_optimizer(model, "adam-mini", **kw)
    ref = Adam_mini(ref_model.named_parameters(), dim=TINY.hidden_size, n_heads=TINY.num_attention_heads,
                    n_kv_heads=TINY.num_attention_heads, verbose=False, **kw)
    for step in side_by_side([(model, ours), (ref_model, ref)], 6):
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


class _NoHeads(nn.Module):
    """Attention-like names but no config: the head count cannot be known."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(16, 16, bias=False)
        self.attn.v_proj = nn.Linear(16, 16, bias=False)


def test_unknown_head_count_fails_with_the_fix():
    with pytest.raises(ValueError) as err:
        distopt.build_optimizer(_NoHeads(), "adam-mini")
    message = str(err.value)
    assert "attn.q_proj.weight" in message and "n_heads=" in message and "rules=" in message
    opt = distopt.build_optimizer(_NoHeads(), "adam-mini", n_heads=4)
    q = opt.param_groups[0]["params"][0]
    opt.allocate_state()
    assert opt.state[q]["exp_avg_sq"].shape == (4,)
    with pytest.raises(ValueError, match="not divisible into 5 head blocks"):
        distopt.build_optimizer(_NoHeads(), "adam-mini", n_heads=5)


def test_head_blocks_on_a_row_shard_that_cuts_a_head():
    # Rows [18, 42) of a 48-row q with 4 heads of 12 rows: heads 1 and 3 are partly held. Head
    # values are kept for all heads (replicated); row values only for the rows held.
    view = MatrixShardView("q", (48, 8), row_start=18, row_end=42)
    plan = blocks.block_plan(view, 12)
    assert (plan.n_blocks, plan.count, plan.numel) == (4, 4, 96)
    rows = blocks.expand_to_rows(torch.tensor([0.0, 1.0, 2.0, 3.0]), view, plan).squeeze(1)
    assert rows.tolist() == [1.0] * 6 + [2.0] * 12 + [3.0] * 6
    grad = torch.ones(24, 8)
    torch.testing.assert_close(blocks.block_mean_sq(grad, view, plan), torch.tensor([0.0, 0.5, 1.0, 0.5]))
    assert blocks.block_plan(view, 1).count == 24


def test_checkpoint_with_other_head_counts_is_refused():
    model = tiny_model()
    opt = distopt.build_optimizer(model, "adam-mini")
    train(model, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="n_heads"):
        distopt.build_optimizer(tiny_model(), "adam-mini", n_heads=2).load_state_dict(sd)




@pytest.mark.parametrize("hparams", [{}, {"weight_decay": 0.1}])
def test_the_batched_step_equals_the_per_matrix_step(hparams, monkeypatch):
    """Same-shape matrices stepped together (packed moments, block means by reshape) give the
    per-matrix step's weights and state, over 6 steps, to the rounding of the block sums."""
    from distopt.optim.adam_mini import AdamMini
    from distopt.optim.base import SubspaceOptimizer

    runs = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(AdamMini, "_step_matrices", SubspaceOptimizer._step_matrices)
        model = tiny_model()
        opt = distopt.build_optimizer(model, "adam-mini", lr=1e-2, **hparams)
        train(model, opt, 6)
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    packed = [s["exp_avg"] for s in opt_a.state.values() if s["exp_avg"].dim() == 2]
    assert any(t._base is not None for t in packed)  # the batched run really packed its moments
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
        for key, value in opt_a.state[x].items():
            torch.testing.assert_close(value, opt_b.state[y][key], rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def test_matrices_left_to_the_per_matrix_step_are_stepped(monkeypatch):
    """The hf form takes the per-matrix path inside the batched routing."""
    from distopt.optim.adam_mini import AdamMini

    assert_routed_matrices_step_as_per_matrix(AdamMini, "adam-mini", monkeypatch, adam_form="hf")
