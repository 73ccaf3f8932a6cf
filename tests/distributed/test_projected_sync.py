"""Projected gradient sync under DDP (``distopt.engines.ddp``): the same numbers as DDP's full
all-reduce after several refresh cycles, replicas that stay bit-identical, the replicate traffic
of the matrices cut to their projections, and refusals where the update needs the full gradient."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import distopt
from distopt.core import comm
from distopt.engines.ddp import sync_by_projection

from .common import OddNet, full_params, hparams, local_batch
from .harness import run_ranks

pytestmark = pytest.mark.distributed
STEPS = 10  # gap 3: three refresh cycles after the first basis
RTOL = 1e-5  # relative (Frobenius) difference of each parameter from the full-sync run
CASES = [
    ("galore", {}),  # randomized refresh, warm-started
    ("galore", {"refresh": "svd"}),  # the whole averaged G of the refreshing matrix
    ("galore", {"side": "longer"}),  # left and right bases on the same shapes
    ("golore", {}),
    ("grassjump", {"recovery_scaling": False}),  # on by default (the paper)
    ("grasswalk", {"recovery_scaling": False}),
]


def _train(rank, world_size, name, extra, projected, accumulate, nan_at=None):
    model = OddNet()
    optimizer = distopt.build_optimizer(model, name, **hparams(name), **extra)
    ddp = DistributedDataParallel(model)
    if projected:
        sync_by_projection(ddp, optimizer)
    comm.reset_traffic()
    current = [0]

    def poison(grad):  # rank 1's gradient of one matrix, as backward makes it (before any sync)
        if current[0] == nan_at and rank == 1:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    model.layers[0].self_attn.q_proj.weight.register_hook(poison)
    for step in range(STEPS):
        current[0] = step
        batch = local_batch(step, rank, world_size)
        if accumulate:  # two micro-batches, the first without DDP's sync
            half = batch.shape[0] // 2
            with ddp.no_sync():
                (ddp(batch[:half]) / 2).backward()
            (ddp(batch[half:]) / 2).backward()
        else:
            ddp(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return full_params(model), comm.traffic()["bytes"].get("replica_all_reduce", 0)


def _worker(rank, world_size, cases, accumulate, nan_at=None):
    out = {}
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        full, _ = _train(rank, world_size, name, extra, False, accumulate, nan_at)
        projected, replica_bytes = _train(rank, world_size, name, extra, True, accumulate, nan_at)
        out[key] = {"full": full, "projected": projected, "replica_bytes": replica_bytes}
    return out


def _check(results, cases):
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        want = results[0][key]["full"]
        # An exact SVD turns the rounding of the average (summed in another order than DDP's
        # buckets) into a basis change scaled by 1 / (singular gap): about 1e-5 on 3 ranks here.
        tolerance = 1e-4 if extra.get("refresh") == "svd" else RTOL
        for rank_result in results:
            got = rank_result[key]["projected"]
            for param, value in want.items():
                error = float((got[param] - value).norm() / value.norm())
                assert error <= tolerance, f"{key} {param}: relative difference {error:.2e} from the full sync"
        # Replicas never drift: every rank holds the very same bits.
        for rank_result in results[1:]:
            for param, value in results[0][key]["projected"].items():
                assert torch.equal(rank_result[key]["projected"][param], value), f"{key} {param}: replicas differ"


@pytest.mark.parametrize("world_size", [2, 3])
def test_projected_sync_equals_full_sync(world_size):
    results = run_ranks(world_size, _worker, CASES, False)
    _check(results, CASES)


def test_projected_sync_with_gradient_accumulation():
    cases = [("galore", {}), ("grassjump", {"recovery_scaling": False})]
    _check(run_ranks(2, _worker, cases, True), cases)


def test_a_nan_on_one_replica_skips_that_matrix_on_every_replica():
    """Under the full sync the NaN reaches every rank through the average, and each skips the
    matrix; under the projected sync only rank 1 sees it, and the skip flag is agreed over the
    replicas, so both runs and all replicas stay equal (a local skip would diverge or hang)."""
    cases = [("galore", {})]
    results = run_ranks(2, _worker, cases, False, 4)
    _check(results, cases)
    for result in results:
        assert torch.isfinite(result["galore[]"]["projected"]["layers.0.self_attn.q_proj.weight"]).all()


def _traffic_worker(rank, world_size):
    """Replicate bytes of the optimizer's averages against the full gradients of its matrices."""
    model = OddNet()
    optimizer = distopt.build_optimizer(model, "galore", **{**hparams("galore"), "update_proj_gap": 1000})
    ddp = DistributedDataParallel(model)
    sync = sync_by_projection(ddp, optimizer)
    ddp(local_batch(0, rank, world_size)).backward()
    optimizer.step()  # the first basis: sketches
    optimizer.zero_grad(set_to_none=True)
    comm.reset_traffic()
    ddp(local_batch(1, rank, world_size)).backward()
    optimizer.step()  # a plain step
    plain = comm.traffic()["bytes"]["replica_all_reduce"]
    synced = {id(p) for p in sync.synced}
    others = sum(4 * p.numel() for p in model.parameters() if id(p) not in synced)
    matrices = sum(4 * p.numel() for p in sync.synced)
    # r values per row of a right basis's m x r projection, per column of a left one's r x n
    projected = sum(4 * 5 * max(view.m, view.n) for view in optimizer.views.values())
    return plain, others, matrices, projected


def test_plain_step_moves_projections_only():
    for plain, others, matrices, projected in run_ranks(2, _traffic_worker):
        assert plain == others + projected  # DDP's hook: the other parameters in full
        assert projected < 0.3 * matrices


def _refusal_worker(rank, world_size, name, extra):
    model = OddNet()
    optimizer = distopt.build_optimizer(model, name, **hparams(name), **extra)
    ddp = DistributedDataParallel(model)
    try:
        sync_by_projection(ddp, optimizer)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("name,extra,reason", [
    ("subtrack", {}, "residual"),
    ("snsm", {}, "full gradient"),
    ("adapm-mini", {}, "full gradient"),
    ("galore", {"recovery_scaling": True}, "recovery_scaling"),
])
def test_refused_where_the_update_needs_the_full_gradient(name, extra, reason):
    messages = run_ranks(2, _refusal_worker, name, extra)
    for message in messages:
        assert message is not None and reason in message and "grad_sync=full" in message
