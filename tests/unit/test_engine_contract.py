"""The optimizer-engine contract: adapters bind through ``SubspaceOptimizer.bind`` and call only
public methods; nothing outside ``distopt/optim`` reaches into an optimizer's private attributes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from torch import nn

import distopt
from distopt.optim.base import EngineBinding

ROOT = Path(__file__).resolve().parents[2]


class _Binding:
    def state_params(self, group):
        return group["params"]

    def state_template(self, p):
        return p

    def begin_step(self, groups):
        pass

    def step_group(self, optimizer, group):
        pass

    def import_value(self, optimizer, p, group, key, value):
        return value

    def check_state_dict(self, optimizer, state_dict):
        pass

    def describe(self, optimizer):
        return {}


def test_bind_takes_a_binding_and_views_of_its_own_matrices_and_resets_what_depends_on_them():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6))
    opt = distopt.build_optimizer(model, "galore", rank=4, rules=[(r"^\d\.weight$", "matrix")])
    weight = opt.parameter("0.weight")
    assert weight is model[0].weight
    group = next(g for g in opt.param_groups if g["kind"] == "matrix")
    assert set(opt.row_sharded_keys(weight, group))  # cached for the build-time view
    assert isinstance(_Binding(), EngineBinding)
    with pytest.raises(TypeError, match="EngineBinding"):
        opt.bind(object(), {})
    with pytest.raises(ValueError, match="not matrices of this optimizer"):
        opt.bind(_Binding(), {model[0].bias: None})
    assert opt.binding is None
    view = dataclasses.replace(opt.views[weight], row_start=0, row_end=0)  # a rank holding no rows
    opt.bind(_Binding(), {weight: view})
    assert opt.binding is not None and opt.views[weight] is view
    assert not opt._row_keys_cache  # recomputed for the new view


def test_no_module_outside_the_optimizers_reaches_into_an_optimizers_private_attributes():
    # ours are named `optimizer`/`opt` (DeepSpeed's is `zopt`)
    pattern = re.compile(r"\b(optimizer|opt)\._[a-z]\w*|getattr\((optimizer|opt), ['\"]_[a-z]")
    found = []
    optimizers = ROOT / "distopt" / "optim"
    files = [f for f in (ROOT / "distopt").rglob("*.py") if optimizers not in f.parents] + list((ROOT / "launch").rglob("*.py"))
    assert len(files) > 10
    for path in sorted(files):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {m.group(0)}" for m in pattern.finditer(line)]
    assert not found, "\n".join(found)
