"""Projected gradient sync under DDP (``distopt.engines.ddp``): the same numbers as DDP's full
all-reduce after several refresh cycles, replicas that stay bit-identical, the replicate traffic
of the matrices cut to their projections, and refusals where the update needs the full gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import distopt
from distopt.core import comm
from distopt.core.projector import resolve_side
from distopt.core.schedule import is_refresh_step, refresh_phase
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


def _train(rank, world_size, name, extra, projected, accumulate, nan_at=None, clip=None, bucket_cap_mb=None):
    model = OddNet()
    optimizer = distopt.build_optimizer(model, name, **hparams(name), **extra)
    ddp = DistributedDataParallel(model, **({} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}))
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
    norms = []
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
        if clip is not None:
            norms.append(float(optimizer.clip_grad_norm_(clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if clip is not None:
        return full_params(model), norms
    return full_params(model), comm.traffic()["bytes"].get("replica_all_reduce", 0)


def _worker(rank, world_size, cases, accumulate, nan_at=None, bucket_cap_mb=None):
    out = {}
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        full, _ = _train(rank, world_size, name, extra, False, accumulate, nan_at, bucket_cap_mb=bucket_cap_mb)
        projected, replica_bytes = _train(rank, world_size, name, extra, True, accumulate, nan_at,
                                          bucket_cap_mb=bucket_cap_mb)
        out[key] = {"full": full, "projected": projected, "replica_bytes": replica_bytes}
    return out


def _check(results, cases, rtol=RTOL):
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        want = results[0][key]["full"]
        for rank_result in results:
            got = rank_result[key]["projected"]
            for param, value in want.items():
                error = float((got[param] - value).norm() / value.norm())
                assert error <= rtol, f"{key} {param}: relative difference {error:.2e} from the full sync"
        # Replicas never drift: every rank holds the very same bits.
        for rank_result in results[1:]:
            for param, value in results[0][key]["projected"].items():
                assert torch.equal(rank_result[key]["projected"][param], value), f"{key} {param}: replicas differ"


@pytest.mark.parametrize("world_size", [2, 3])
def test_projected_sync_equals_full_sync(world_size):
    results = run_ranks(world_size, _worker, CASES, False)
    _check(results, CASES)


def _expected_svd_bytes(extra):
    """Replicate bytes of a projected run with one DDP bucket per parameter: every step the other
    parameters in full, and each matrix either its projection or, at its exact refresh, its whole
    gradient (its bucket, all-reduced as DDP does)."""
    model = OddNet()
    optimizer = distopt.build_optimizer(model, "galore", **hparams("galore"), **extra)
    matrices = {id(p) for group in optimizer.param_groups if group["kind"] == "matrix" for p in group["params"]}
    others = sum(4 * p.numel() for p in model.parameters() if id(p) not in matrices)
    gap, rank = hparams("galore")["update_proj_gap"], hparams("galore")["rank"]
    total = 0
    for step in range(STEPS):
        total += others
        for view in optimizer.views.values():
            due = is_refresh_step(step, gap, refresh_phase(view.name, gap, True))
            projected = view.m if resolve_side(extra.get("side", "auto"), view.global_shape) == "right" else view.n
            total += 4 * (view.m * view.n if due else rank * projected)
    return total


@pytest.mark.parametrize("world_size", [2, 3])
def test_exact_svd_refresh_averages_its_bucket_as_ddp_does(world_size):
    """One DDP bucket per parameter, so the matrices really move projections between refreshes. At
    a matrix's ``svd`` refresh its bucket is all-reduced whole, as DDP's own hook does it, and the
    SVD decomposes the very average of the full-sync run: a per-matrix average of another summation
    order, turned into a basis change by 1 / (singular gap), was 1.2e-5 off on 3 ranks."""
    # "rotate": under "keep" a singular vector whose LAPACK sign flips with the last bit of G negates
    # its momentum, and the two syncs, which round differently between refreshes, part for good.
    cases = [("galore", {"refresh": "svd", "moment_policy": "rotate"}),
             ("galore", {"refresh": "svd", "side": "longer", "moment_policy": "rotate"})]
    results = run_ranks(world_size, _worker, cases, False, None, 1e-6)
    _check(results, cases)
    for name, extra in cases:
        key, expected = name + str(sorted(extra.items())), _expected_svd_bytes(extra)
        for result in results:
            value = result[key]
            assert value["replica_bytes"] == expected, f"{key}: {value['replica_bytes']} replicate bytes, {expected} expected"


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


def _scaled_loss_reference(rank, world_size, name, extra, clip):
    """Clipping by another road: the norm measured on a copy of the optimizer (so no refresh happens
    twice), then the step's loss multiplied by the clip factor, which scales every gradient by it."""
    model = OddNet()
    optimizer = distopt.build_optimizer(model, name, **hparams(name), **extra)
    ddp = DistributedDataParallel(model)
    norms = []
    for step in range(STEPS):
        batch = local_batch(step, rank, world_size)
        ddp(batch).backward()
        probe_model = copy.deepcopy(model)
        for mine, theirs in zip(model.parameters(), probe_model.parameters()):
            theirs.grad = mine.grad.clone()
        probe = distopt.build_optimizer(probe_model, name, **hparams(name), **extra)
        probe.load_state_dict(optimizer.state_dict())
        norms.append(float(probe.clip_grad_norm_(math.inf)))
        optimizer.zero_grad(set_to_none=True)
        (ddp(batch) * min(1.0, clip / (norms[-1] + 1e-6))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return full_params(model), norms


def _clip_worker(rank, world_size, cases, clip):
    out = {}
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        scaled, full_norms = _scaled_loss_reference(rank, world_size, name, extra, clip)
        full, _ = _train(rank, world_size, name, extra, False, False, clip=clip)
        projected, norms = _train(rank, world_size, name, extra, True, False, clip=clip)
        unclipped, _ = _train(rank, world_size, name, extra, True, False)
        out[key] = {"full": full, "scaled": scaled, "projected": projected, "unclipped": unclipped,
                    "full_norms": full_norms, "norms": norms}
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_clipping_by_the_synced_norm_equals_the_full_sync_clipped_the_same_way(world_size):
    """``clip_grad_norm_`` measures the projections (in this step's basis) and the other gradients:
    the same norm on every replica as in the full-sync run, the same steps as the full-sync run
    clipped by the same method (1e-5) and as one whose loss is scaled by the clip factor (1e-4)."""
    cases = [("galore", {}), ("grasswalk", {"recovery_scaling": False})]
    clip = 0.3
    results = run_ranks(world_size, _clip_worker, cases, clip)
    _check(results, cases)  # the full-sync run clipped with the same clip_grad_norm_
    # An independent road: the loss scaled by the clip factor (other roundings: 1e-5 on small biases).
    _check([{key: {**value, "full": value["scaled"]} for key, value in r.items()} for r in results], cases, rtol=1e-4)
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        norms = [r[key]["norms"] for r in results]
        assert all(n == norms[0] for n in norms), f"{key}: replicas measured different norms"
        assert norms[0] == pytest.approx(results[0][key]["full_norms"], rel=1e-5)
        assert sum(n > clip for n in norms[0]) >= STEPS // 2, f"{key}: clipping never took effect: {norms[0]}"
        moved = [float((results[0][key]["unclipped"][k] - v).norm() / v.norm())
                 for k, v in results[0][key]["projected"].items()]
        assert max(moved) > 1e-3, f"{key}: clipping changed nothing"


def _hsdp_train(rank, world_size, name, extra, mesh_shape, projected, clip=None, return_traffic=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distopt.engines import hsdp

    model = OddNet()
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    on = mesh["shard"] if projected else mesh
    for layer in model.layers:
        fully_shard(layer, mesh=on)
    fully_shard(model, mesh=on)
    optimizer = distopt.build_optimizer(model, name, **hparams(name), **extra)
    sync = hsdp.sync_by_projection(model, optimizer, mesh) if projected else None
    comm.reset_traffic()
    for step in range(STEPS):
        model(local_batch(step, rank, world_size)).backward()
        if sync is not None:
            sync.reduce_others()
        if clip is not None:
            optimizer.clip_grad_norm_(clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if return_traffic:
        return full_params(model), comm.traffic()["bytes"].get("replica_all_reduce", 0)
    return full_params(model)


def _hsdp_clip_worker(rank, world_size, cases, mesh_shape, clip):
    out = {}
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        projected, clipped_bytes = _hsdp_train(rank, world_size, name, extra, mesh_shape, True, clip, True)
        _, unclipped_bytes = _hsdp_train(rank, world_size, name, extra, mesh_shape, True, None, True)
        out[key] = {"full": _scaled_loss_reference(rank, world_size, name, extra, clip)[0], "projected": projected,
                    "replica_bytes": (clipped_bytes, unclipped_bytes)}
    return out


def test_hsdp_clipping_by_the_synced_norm():
    """HSDP 2 x 2 with projected sync and clipping against DDP on the same 4 ranks, full sync, with
    the loss scaled by the clip factor of the same norm: row shards, column chunks and whole left
    projections each counted once in the norm."""
    cases = [("galore", {}), ("galore", {"state_layout": "replicated"})]
    results = run_ranks(4, _hsdp_clip_worker, cases, (2, 2), 0.3)
    _check(results, cases, rtol=1e-4)
    for result in results:  # step() reuses the projections clipping took: no second replica average
        for key, value in result.items():
            clipped, unclipped = value["replica_bytes"]
            assert clipped == unclipped > 0, f"{key}: {clipped} replicate bytes clipped, {unclipped} without"


def _hsdp_worker(rank, world_size, cases, mesh_shape):
    out = {}
    for name, extra in cases:
        key = name + str(sorted(extra.items()))
        out[key] = {"full": _hsdp_train(rank, world_size, name, extra, mesh_shape, False),
                    "projected": _hsdp_train(rank, world_size, name, extra, mesh_shape, True)}
    return out


@pytest.mark.parametrize("mesh_shape", [(2, 2), (3, 1)])
def test_hsdp_projected_sync_equals_hsdp(mesh_shape):
    """HSDP 2 x 2 (row shards: the left side's reduce-scatter, chunked right bases, the coalesced
    bucket path) and 3 x 1 against FSDP2's own replicate all-reduce, every algorithm that takes the mode."""
    # svd with "rotate", as above: under "keep" a LAPACK sign that flips with the last bits of G (the
    # 5th singular vector of a 53 x 37 gradient here, for 1 in 20 perturbations of 1e-7) parts the runs.
    cases = [("galore", {}), ("galore", {"refresh": "svd", "moment_policy": "rotate"}), ("golore", {}),
             ("grassjump", {"recovery_scaling": False}), ("grasswalk", {"recovery_scaling": False})]
    world = mesh_shape[0] * mesh_shape[1]
    _check(run_ranks(world, _hsdp_worker, cases, mesh_shape), cases)


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
