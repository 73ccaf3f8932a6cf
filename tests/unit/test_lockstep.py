"""Lockstep routines on one process: the drivers' contract (the multi-rank behaviour is checked in
tests/distributed/test_fsdp2.py)."""

from __future__ import annotations

import pytest
import torch

from distopt.core import lockstep, projector
from distopt.core.shard import MatrixShardView


def _routine(x: torch.Tensor, shape=None):
    total = yield lockstep.Sum(x.clone(), None)
    stacked = yield lockstep.Gather(total, None)
    doubled = yield lockstep.Owned(lambda: 2 * stacked[0].T, shape or (x.shape[1], x.shape[0]), 1.0, None, x.device)
    return doubled + 1


def test_one_process_requests_are_plain_operations():
    x = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(lockstep.run(_routine(x)), 2 * x.T + 1)


def test_together_equals_one_at_a_time_for_routines_of_different_lengths():
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    view = MatrixShardView(name="w", global_shape=(40, 30))
    requests = [
        projector.RangeRequest(g, view, "right", 4, 3, 1, 7),
        projector.RangeRequest(g.T.contiguous(), MatrixShardView(name="wt", global_shape=(30, 40)), "left", 5, 2, 2, 8),
    ]
    together = projector.randomized_bases(requests)
    for request, basis in zip(requests, together):
        torch.testing.assert_close(basis, projector.compute_basis(request), rtol=0, atol=0)
    x = torch.ones(2, 2)
    mixed = lockstep.run_together([_routine(x), projector._range_finder(requests[0])])
    torch.testing.assert_close(mixed[0], 2 * x.T + 1)


def test_an_owned_result_of_another_shape_than_announced_is_refused():
    x = torch.zeros(2, 3)
    for drive in (lockstep.run, lambda routine: lockstep.run_together([routine])[0]):
        with pytest.raises(RuntimeError, match="announced"):
            drive(_routine(x, shape=(2, 3)))


def test_a_prepared_basis_is_used_only_for_the_same_inputs():
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    view = MatrixShardView(name="w", global_shape=(40, 30))
    request = projector.RangeRequest(g, view, "right", 4, 3, 1, 7)
    with projector.prepared_bases([request]):
        ready = projector._prepared[view.name][1]
        assert projector.compute_basis(request) is ready
    other = g.clone()
    other[0, 0] += 1.0
    with projector.prepared_bases([request]):
        fresh = projector.randomized_basis(other, view, "right", 4, oversample=3, power_iters=1, seed=7)
        assert fresh is not ready and not torch.equal(fresh, ready)
    torch.testing.assert_close(fresh, projector.compute_basis(projector.RangeRequest(other, view, "right", 4, 3, 1, 7)))
    assert not projector._prepared  # nothing outlives its step
