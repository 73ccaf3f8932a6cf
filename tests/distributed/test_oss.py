"""Whole-parameter sharders: ZeroRedundancyOptimizer and fairscale OSS wrapping distopt
optimizers on 2 gloo ranks give the 1-process numbers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from distopt.engines import oss
from distopt.optim import REGISTRY

from .common import OddNet, full_params, hparams, train_steps
from .harness import run_ranks
from .test_fsdp2 import ATOL, RTOL, _reference

pytestmark = pytest.mark.distributed
NAMES = ["galore", "golore", "adamw"]


def _worker(rank, world_size, wrapper, names):
    out = {}
    for name in names:
        model = OddNet()
        opt = getattr(oss, wrapper)(model, name, **hparams(name))
        ddp = DistributedDataParallel(model)
        train_steps(ddp, opt, 10, rank, world_size)
        out[name] = full_params(model)
    return out


@pytest.mark.parametrize("wrapper", ["zero_redundancy_optimizer", "fairscale_oss"])
def test_wrapped_optimizer_matches_one_process(wrapper):
    if wrapper == "fairscale_oss":
        pytest.importorskip("fairscale")
    names = [n for n in NAMES if n in REGISTRY]
    results = run_ranks(2, _worker, wrapper, names)
    for name in names:
        want = _reference(name)
        for rank_result in results:
            for key, value in want.items():
                torch.testing.assert_close(rank_result[name][key], value, rtol=RTOL, atol=ATOL, msg=f"{name} {key}")
