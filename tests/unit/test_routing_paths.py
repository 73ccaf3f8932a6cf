"""Every builder routes through one path (``distopt.api.route``): build_optimizer, DeepSpeed's
one-group-per-parameter builder and the ZeRO-R / fairscale OSS wrappers agree on which parameters
are matrices and refuse the same inputs with the same messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distopt
from distopt.engines import oss
from distopt.engines.deepspeed import build_partitioned_optimizer


class Block(nn.Module):
    def __init__(self, q_rows: int = 12, conv: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.q_proj = nn.Linear(8, q_rows, bias=False)  # 0 rows: a pruned layer, nothing to project
        self.up_proj = nn.Linear(8, 20)
        self.norm = nn.LayerNorm(8)
        if conv:  # a 3-D weight whose name routes it to the matrix group
            self.v_proj = nn.Module()
            self.v_proj.weight = nn.Parameter(torch.randn(4, 4, 4))


def _oss_kinds(model, name, **kw):
    _, _, groups = oss._resolve(model, name, {}, kw.get("rules"), kw.get("use_default_rules", True), None)
    return {p._distopt_name: g["kind"] for g in groups for p in g["params"]}


def _kinds_of_every_builder(make, name="galore", **kw):
    model = make()
    opt = distopt.build_optimizer(model, name, **kw)
    kinds = {"build_optimizer": {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}}
    opt = build_partitioned_optimizer(make(), name, **kw)
    kinds["deepspeed"] = {g["param_names"][0]: g["kind"] for g in opt.param_groups}
    kinds["oss"] = _oss_kinds(make(), name, **kw)
    return kinds


@pytest.mark.parametrize("q_rows", [12, 0])
def test_every_builder_routes_the_same_parameters_to_the_matrix_group(q_rows):
    kinds = _kinds_of_every_builder(lambda: Block(q_rows))
    want = {"embed_tokens.weight": "adamw", "q_proj.weight": "matrix" if q_rows else "adamw",
            "up_proj.weight": "matrix", "up_proj.bias": "adamw", "norm.weight": "adamw", "norm.bias": "adamw"}
    assert kinds == {path: want for path in kinds}


def test_every_builder_honours_the_rules_and_use_default_rules():
    kinds = _kinds_of_every_builder(Block, rules=[(r"^q_proj\.weight$", "other")], use_default_rules=True)
    assert all(k["q_proj.weight"] == "adamw" and k["up_proj.weight"] == "matrix" for k in kinds.values())
    kinds = _kinds_of_every_builder(Block, rules=[(r"q_proj\.weight$", "matrix")], use_default_rules=False)
    assert all(k["q_proj.weight"] == "matrix" and k["up_proj.weight"] == "adamw" for k in kinds.values()), kinds


def test_every_builder_refuses_a_3d_weight_in_the_matrix_group_and_an_unknown_name():
    builders = {
        "build_optimizer": distopt.build_optimizer,
        "deepspeed": build_partitioned_optimizer,
        "zero_redundancy_optimizer": oss.zero_redundancy_optimizer,  # refused before the wrapper needs a group
    }
    for build in builders.values():
        with pytest.raises(ValueError, match=r"'v_proj.weight' of shape \(4, 4, 4\) reached the matrix group"):
            build(Block(conv=True), "galore")
        with pytest.raises(ValueError, match=r"unknown optimizer .*galor'.*Did you mean '(distopt\.)?galore'"):
            build(Block(), "galor")
        with pytest.raises(ValueError, match="unknown keys"):
            build(Block(), "galore", elementwise={"lrr": 1e-3})


def test_every_optimizer_takes_its_options_by_keyword_only():
    import inspect

    from distopt.optim import REGISTRY

    for name, cls in REGISTRY.items():
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert parameters[0].name == "params", name
        positional = [p.name for p in parameters[1:] if p.kind != p.KEYWORD_ONLY]
        assert not positional, f"{name}: {positional} can be passed by position"
    with pytest.raises(TypeError):
        REGISTRY["galore"]([torch.nn.Parameter(torch.zeros(4, 4))], 0.01)


def test_old_hyper_parameter_names_are_renamed_with_a_warning_and_load_from_checkpoints():
    import warnings

    from helpers import roundtrip, tiny_model, train

    model = tiny_model()
    with pytest.warns(FutureWarning, match="init= is now called refresh="):
        opt = distopt.build_optimizer(model, "grassjump", rank=4, init="svd")
    assert opt.param_groups[0]["refresh"] == "svd" and "init" not in opt.param_groups[0]
    with pytest.raises(TypeError, match="give only refresh="):
        distopt.build_optimizer(tiny_model(), "golore", galore_refresh="svd", refresh="svd")
    train(model, opt, 2)
    saved = roundtrip(opt.state_dict())
    for group in saved["param_groups"]:  # as written before the rename
        if "refresh" in group:
            group["init"] = group.pop("refresh")
    fresh = distopt.build_optimizer(tiny_model(), "grassjump", rank=4, refresh="svd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(saved)
    assert fresh.resumed_changes == [] and all("init" not in g for g in fresh.param_groups)
