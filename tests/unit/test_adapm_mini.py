"""AdaPM-mini: AdaPM's momentum design with Adam-mini's block second moment."""


import pytest
import torch
from helpers import set_grads
from optim_checks import assert_matrix_group_trains, assert_refused, assert_state_bytes_match, matrix_group, one_thread  # noqa: F401 (a fixture, used by name)
from torch import nn

import distopt
from distopt.models import LlamaShape, TinyLlama

GQA = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)


def _gqa_model():
    torch.manual_seed(0)
    return TinyLlama(GQA)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_second_moment_with_adapm_momentum():
    model = _gqa_model()
    opt = distopt.build_optimizer(model, "adapm-mini", rank=2)
    opt.allocate_state()
    blocks = {"q_proj": 4, "k_proj": 2, "v_proj": 24, "o_proj": 48, "gate_proj": 80, "up_proj": 80,
              "down_proj": 48, "embed_tokens": 96, "lm_head": 96}
    momentum = {"q_proj": {"left", "right"}, "k_proj": {"left", "right"}, "gate_proj": {"left", "right"},
                "up_proj": {"left", "right"}, "down_proj": {"left", "right"}, "v_proj": {"exp_avg"},
                "lm_head": {"exp_avg"}, "o_proj": set(), "embed_tokens": set()}
    group = matrix_group(opt)
    for name, p in zip(group["param_names"], group["params"]):
        key = name.split(".")[-2]
        state = opt.state[p]
        assert state["exp_avg_sq"].shape == (blocks[key],), name
        assert set(state) - {"step", "exp_avg_sq"} == momentum[key], name


def test_second_moment_equals_adam_minis():
    """Both use the shared block code: identical gradients give identical block second moments."""
    models = [_gqa_model(), _gqa_model()]
    opts = [distopt.build_optimizer(models[0], "adapm-mini", betas=(0.9, 0.95)),
            distopt.build_optimizer(models[1], "adam-mini", betas=(0.9, 0.95))]
    for step in range(3):
        for model, opt in zip(models, opts):
            set_grads(list(model.parameters()), step)
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if "norm" not in name:
            assert torch.equal(opts[0].state[a]["exp_avg_sq"], opts[1].state[b]["exp_avg_sq"]), name


def test_no_momentum_block_steps_by_gradient_over_block_rms():
    model = _gqa_model()
    opt = distopt.build_optimizer(model, "adapm-mini", lr=1e-2, betas=(0.9, 0.99), clip=None, weight_decay=0.0)
    o = model.model.layers[0].self_attn.o_proj.weight
    for seed in range(2):
        set_grads(list(model.parameters()), seed)
        before = o.detach().clone()
        opt.step()
    v = opt.state[o]["exp_avg_sq"].unsqueeze(1)  # one value per row
    expected = 1e-2 * o.grad / ((v / (1 - 0.99**2)).sqrt() + 1e-8)
    torch.testing.assert_close(before - o.detach(), expected, rtol=1e-4, atol=1e-8)


class _NoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = nn.Linear(16, 8, bias=False)


def test_unknown_head_count_fails_with_the_fix():
    with pytest.raises(ValueError, match=r"'k_proj.weight'.*n_heads=\.\.\."):
        distopt.build_optimizer(_NoHeads(), "adapm-mini")
    distopt.build_optimizer(_NoHeads(), "adapm-mini", n_heads=4, n_kv_heads=2)


