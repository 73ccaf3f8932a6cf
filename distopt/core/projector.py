"""Projection onto a rank-r subspace of one side of a (possibly row-sharded) matrix.

Conventions, for a gradient ``G`` of global shape ``m x n``:
- ``right``: basis ``Q`` is ``n x r`` and replicated; ``R = G Q`` is ``m x r`` and row-sharded like G;
  back-projection ``N Q^T``. No communication per step.
- ``left``: basis ``P`` is ``m x r`` and row-sharded like G; ``R = P^T G`` is ``r x n``, a sum over
  the row shards; back-projection ``P N`` gives this rank's rows.
- ``auto`` picks the shorter side, as GaLore does: ``right`` when ``m >= n``, else ``left``.

Refresh methods produce a new orthonormal basis from the current gradient:
- ``svd``: exact, from ``torch.linalg.svd`` of the fp32 gradient (the reference);
- ``randomized``: subspace iteration warm-started from the previous basis plus ``oversample``
  Gaussian columns, ``power_iters`` passes, then a Rayleigh-Ritz step to keep the top ``r``;
- ``random``: a seeded Haar basis, with no communication and no gradient.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

from . import comm
from .linalg import align_signs, haar_basis, orthonormalize, orthonormalize_rows, seeded_gaussian
from .shard import MatrixShardView

SIDES = ("auto", "left", "right")
REFRESH_METHODS = ("svd", "randomized", "random")


def resolve_side(side: str, global_shape: tuple[int, int]) -> str:
    if side not in SIDES:
        raise ValueError(f"side={side!r} is not one of {SIDES}")
    if side == "auto":
        m, n = global_shape
        return "right" if m >= n else "left"
    return side


def side_dim(side: str, global_shape: tuple[int, int]) -> int:
    """Length of the basis vectors: ``n`` for a right basis, ``m`` for a left one."""
    return global_shape[1] if side == "right" else global_shape[0]


def basis_local_shape(side: str, view: MatrixShardView, r: int) -> tuple[int, int]:
    return (view.n, r) if side == "right" else (view.local_rows, r)


def projected_local_shape(side: str, view: MatrixShardView, r: int) -> tuple[int, int]:
    return (view.local_rows, r) if side == "right" else (r, view.n)


def project(g: torch.Tensor, basis: torch.Tensor, side: str, group) -> torch.Tensor:
    if side == "right":
        return g @ basis
    return comm.all_reduce_sum(basis.T @ g, group)


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return low @ basis.T if side == "right" else basis @ low


def change_of_basis(new: torch.Tensor, old: torch.Tensor, side: str, group) -> torch.Tensor:
    """``C = new^T old`` (r x r): coordinates in ``old`` map to ``new`` by ``C`` (left) or ``C^T`` (right)."""
    c = new.T @ old
    return comm.all_reduce_sum(c, group) if side == "left" else c


def rotate_projected(low: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
    """Express projected coordinates in the new basis: ``C M`` (left) or ``M C^T`` (right)."""
    return c @ low if side == "left" else low @ c.T


def svd_basis(g: torch.Tensor, view: MatrixShardView, side: str, r: int) -> torch.Tensor:
    """Exact basis from ``torch.linalg.svd`` of the fp32 gradient (its singular vectors, signs
    included). Row-sharded: the view's owner gathers the matrix (one collective), factors it, and
    broadcasts the basis. A basis computed ahead by :func:`svd_bases` for this step is used as is."""
    ready = _prepared.pop(view.name, None)
    if ready is not None and ready[0] == (side, r):
        return ready[1]
    return svd_bases([(g, view, side, r)])[0]


def svd_bases(requests: list[tuple[torch.Tensor, MatrixShardView, str, int]]) -> list[torch.Tensor]:
    """:func:`svd_basis` of several ``(g, view, side, r)`` at once, the owners factoring in parallel.

    Work goes in rounds that give each owner at most one matrix. The next round's gathers start
    before this round's factorizations and broadcasts, so an owner that finishes early goes on with
    its next matrix instead of waiting for the slowest, and no rank holds more than two gathered
    matrices. Every rank must pass the same requests in the same order (they depend only on names,
    shapes and the step), so the collectives line up.
    """
    queues: dict[int, list[int]] = {}
    for i, (_, view, _, _) in enumerate(requests):
        queues.setdefault(view.owner, []).append(i)
    rounds = [[i for i in round_ if i is not None] for round_ in itertools.zip_longest(*queues.values())]

    def start_gathers(picked):
        return comm.gather_rows_async(
            [(requests[i][0].float(), list(requests[i][1].row_counts), requests[i][1].owner, requests[i][1].group) for i in picked]
        )

    out: list[torch.Tensor | None] = [None] * len(requests)
    broadcasts = []
    gathering = start_gathers(rounds[0]) if rounds else None
    for j, picked in enumerate(rounds):
        fulls = gathering()
        if j + 1 < len(rounds):
            gathering = start_gathers(rounds[j + 1])
        bases = []
        for i, full in zip(picked, fulls):
            g, view, side, r = requests[i]
            if full is not None:
                u, _, vh = torch.linalg.svd(full, full_matrices=False)
                bases.append(vh[:r].T.contiguous() if side == "right" else u[:, :r].contiguous())
            else:
                bases.append(torch.empty((side_dim(side, view.global_shape), r), dtype=torch.float32, device=g.device))
            out[i] = bases[-1]
        broadcasts.append(comm.broadcast_async([(basis, requests[i][1].owner, requests[i][1].group) for i, basis in zip(picked, bases)]))
    for wait in broadcasts:
        wait()
    for i, (_, view, side, _) in enumerate(requests):
        if side == "left":
            out[i] = out[i][view.row_start : view.row_end].contiguous()
    return out


_prepared: dict[str, tuple[tuple[str, int], torch.Tensor]] = {}


@contextmanager
def prepared_svd_bases(requests: list[tuple[torch.Tensor, MatrixShardView, str, int]]):
    """Compute the exact bases of ``requests`` together (:func:`svd_bases`); inside the context,
    :func:`svd_basis` of each of those matrices returns its basis instead of factoring alone.
    Whatever is not asked for is dropped on exit, so no basis outlives its step."""
    bases = svd_bases(requests)
    _prepared.update({view.name: ((side, r), basis) for (_, view, side, r), basis in zip(requests, bases)})
    try:
        yield
    finally:
        _prepared.clear()


def random_basis(view: MatrixShardView, side: str, r: int, seed: int, device) -> torch.Tensor:
    basis = haar_basis(side_dim(side, view.global_shape), r, seed, device)
    if side == "left":
        basis = basis[view.row_start : view.row_end]
    return basis.contiguous()


def _canonical_signs(vecs: torch.Tensor) -> torch.Tensor:
    # Eigenvectors are defined up to sign; fix it so ranks and world sizes agree.
    pivots = vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True))
    return vecs * torch.where(pivots < 0, -1.0, 1.0).to(vecs.dtype)


def randomized_basis(
    g: torch.Tensor,
    view: MatrixShardView,
    side: str,
    r: int,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``r`` basis of ``side`` by a warm-started randomized range finder.

    Communication when row-sharded: one ``n x k`` all-reduce per ``G^T Y`` product, a ``k x k``
    all-gather per row orthonormalization, and a ``k x k`` all-reduce for Rayleigh-Ritz.
    """
    g = g.float()
    group, counts = view.group, view.row_counts
    k = min(r + oversample, view.m, view.n)
    n_random = k - (previous.shape[1] if previous is not None else 0)
    omega = seeded_gaussian((view.n, max(n_random, 0)), seed, g.device)

    def orth_rows(y):
        return orthonormalize_rows(y, group, counts)

    def gt_times(y):  # G^T Y, summed over row shards
        return comm.all_reduce_sum(g.T @ y, group)

    if side == "right":
        # No QR of the start block: the iterates' spans, hence the Ritz vectors, do not depend on it.
        x = omega if previous is None else torch.cat([previous, omega], dim=1)
        for _ in range(power_iters + 1):
            x = orthonormalize(gt_times(orth_rows(g @ x)))
        z = g @ x
        gram = comm.all_reduce_sum(z.T @ z, group)
    else:
        y = g @ omega
        if previous is not None:
            y = torch.cat([previous, y], dim=1)
        y = orth_rows(y)
        for _ in range(power_iters):
            y = orth_rows(g @ orthonormalize(gt_times(y)))
        x = y
        z = gt_times(y)
        gram = z.T @ z
    _, vecs = torch.linalg.eigh(gram.double())
    top = _canonical_signs(vecs[:, -r:].flip(1)).to(x.dtype)  # descending eigenvalues
    basis = x @ top
    if previous is not None:
        basis = align_signs(basis, previous, group if side == "left" else None)
    return basis.contiguous()
