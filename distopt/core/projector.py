"""Projection onto a rank-r subspace of one side of a (possibly row-sharded) matrix.

Conventions, for a gradient ``G`` of global shape ``m x n``:
- ``right``: basis ``Q`` is ``n x r`` (whole here; ``core.subspace`` may keep it in chunks); ``R = G Q``
  is ``m x r`` and row-sharded like G; back-projection ``N Q^T``. No communication.
- ``left``: basis ``P`` is ``m x r`` and row-sharded like G; ``R = P^T G`` is ``r x n``, a sum over
  the row shards; back-projection ``P N`` gives this rank's rows.
- ``auto`` picks the shorter side, as GaLore does: ``right`` when ``m >= n``, else ``left``.
- ``longer`` picks the longer side (``left`` when ``m > n``, else ``right``): the basis is
  ``max(m, n) x r`` and each projected moment ``r x min(m, n)``. With Adam's two moments that holds
  ``r (max + 2 min)`` values against ``auto``'s ``r (min + 2 max)``: 26% less for a LLaMA-7B MLP
  matrix. The cost under row sharding is traffic (``docs/engines.md``).

Refresh methods produce a new orthonormal basis from the current gradient:
- ``svd``: exact, from ``torch.linalg.svd`` of the fp32 gradient (the reference);
- ``randomized``: subspace iteration warm-started from the previous basis plus ``oversample``
  Gaussian columns, ``power_iters`` passes, then a Rayleigh-Ritz step to keep the top ``r``. That
  step takes the eigenvectors (fp64) of the ``k x k`` Gram ``z^T z``, one small all-reduce on row
  shards; against an fp64 SVD of the same sketch it gives the same subspace to a principal-angle
  sine of at most 3e-6 and the same captured energy to 2e-7, for ``1/i``, ``1/i^2`` and ``e^{-i/20}``
  spectra (``benchmarks/rayleigh_ritz.py``), so no TSQR of the sketch is spent on it;
- ``random``: a seeded Haar basis, with no communication and no gradient.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, cast

import torch

from . import comm, lockstep
from .linalg import align_signs, flip_to_overlap, haar_basis, orthonormalize, orthonormalize_rows_routine, seeded_gaussian
from .shard import MatrixShardView

SIDES = ("auto", "left", "right", "longer")
REFRESH_METHODS = ("svd", "randomized", "random")


def resolve_side(side: str, global_shape: tuple[int, int]) -> str:
    if side not in SIDES:
        raise ValueError(f"side={side!r} is not one of {SIDES}")
    m, n = global_shape
    if side == "auto":
        return "right" if m >= n else "left"
    if side == "longer":
        return "left" if m > n else "right"
    return side


def side_dim(side: str, global_shape: tuple[int, int]) -> int:
    """Length of the basis vectors: ``n`` for a right basis, ``m`` for a left one."""
    return global_shape[1] if side == "right" else global_shape[0]


# The operand dtype of projection products (proj(G), back(N)) inside products_in(); None: as given.
_product_dtype: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("product_dtype", default=None)
_no_fp32_out: set[str] = set()  # device types whose GEMM gave no fp32 output from bf16 operands


@contextmanager
def products_in(dtype: torch.dtype | None):
    """Give :func:`project_local` and :func:`project_back` ``dtype`` operands (``bfloat16``: half the
    bytes read, and tensor cores on a GPU) with fp32 accumulation and an fp32 result. Refreshes never
    go through these functions, so a basis is always computed from fp32 products."""
    token = _product_dtype.set(dtype)
    try:
        yield
    finally:
        _product_dtype.reset(token)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    dtype = _product_dtype.get()
    if dtype is None:
        if a.dim() == b.dim() == 3:  # a batch: bmm itself, without matmul's reshapes (a dozen ops)
            return torch.bmm(a, b, out=out)
        return torch.matmul(a, b, out=out)
    if a.device.type == "cuda" and a.device.type not in _no_fp32_out and a.dim() == b.dim() and a.dim() in (2, 3):
        product = torch.mm if a.dim() == 2 else torch.bmm
        try:
            if out is None:
                return product(a.to(dtype), b.to(dtype), out_dtype=torch.float32)
            return product(a.to(dtype), b.to(dtype), out_dtype=torch.float32, out=out)
        except (NotImplementedError, RuntimeError):
            _no_fp32_out.add(a.device.type)
    # Elsewhere the same numbers (up to summation order) from an fp32 GEMM of the rounded operands:
    # the product of two bf16 values is exact in fp32. CPUs without bf16 units run it ~30x faster.
    return torch.matmul(a.to(dtype).float(), b.to(dtype).float(), out=out)


def project_local(g: torch.Tensor, basis: torch.Tensor, side: str, out: torch.Tensor | None = None,
                  basis_t: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's ``G Q`` (right) or partial ``P^T G`` (left, summed over the row shards by
    :func:`project`). ``g`` and ``basis`` may carry a leading batch dimension (one ``bmm``);
    ``basis_t``, ``basis.transpose(-2, -1)`` where the caller keeps that view."""
    if side == "right":
        return _matmul(g, basis, out=out)
    return _matmul(basis.transpose(-2, -1) if basis_t is None else basis_t, g, out=out)


def project(g: torch.Tensor, basis: torch.Tensor, side: str, group) -> torch.Tensor:
    low = project_local(g, basis, side)
    return low if side == "right" else comm.all_reduce_sum(low, group)


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str, out: torch.Tensor | None = None,
                 basis_t: torch.Tensor | None = None) -> torch.Tensor:
    """``N Q^T`` (right) or ``P N`` (left), batched like :func:`project_local`."""
    if side == "right":
        return _matmul(low, basis.transpose(-2, -1) if basis_t is None else basis_t, out=out)
    return _matmul(basis, low, out=out)


def scaled_back(low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float, out: torch.Tensor | None = None,
                basis_t: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha back(low)``, batched like :func:`project_back`: into ``out`` (whatever it holds) as one
    ``baddbmm`` whose factor scales the product, where there is an ``out`` and a batch."""
    if alpha == 1.0:
        return project_back(low, basis, side, out=out, basis_t=basis_t)
    if out is not None and _product_dtype.get() is None and low.dim() == basis.dim() == out.dim() == 3:
        if side == "right":
            return out.baddbmm_(low, basis.transpose(-2, -1) if basis_t is None else basis_t, beta=0.0, alpha=alpha)
        return out.baddbmm_(basis, low, beta=0.0, alpha=alpha)
    return project_back(low, basis, side, out=out, basis_t=basis_t).mul_(alpha)


def add_back(target: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float = 1.0,
             basis_t: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
    """``target <- beta target + alpha back(low)`` in place, batched like :func:`project_back`: one
    ``baddbmm`` into ``target`` with no full-size temporary (with :func:`products_in` operands, a
    product added)."""
    if _product_dtype.get() is None and target.dim() == low.dim() == basis.dim() == 3:
        if side == "right":
            return target.baddbmm_(low, basis.transpose(-2, -1) if basis_t is None else basis_t, beta=beta, alpha=alpha)
        return target.baddbmm_(basis, low, beta=beta, alpha=alpha)
    if beta != 1.0:
        target.mul_(beta)
    return target.add_(project_back(low, basis, side, basis_t=basis_t), alpha=alpha)


def change_of_basis(new: torch.Tensor, old: torch.Tensor, side: str, group) -> torch.Tensor:
    """``C = new^T old`` (r x r): coordinates in ``old`` map to ``new`` by ``C`` (left) or ``C^T`` (right)."""
    c = new.T @ old
    return comm.all_reduce_sum(c, group) if side == "left" else c


def unseen_fraction(new: torch.Tensor, old: torch.Tensor, c: torch.Tensor, side: str, group) -> torch.Tensor:
    """``u_j = ||(I - old old^T) new_j||^2``: how much of each new basis vector lies outside the old
    span. Formed from the residual, not as ``1 - sum_i C_ji^2``, whose rounding (``~1e-7``) would
    weigh on coordinates whose second moment is that much smaller than their neighbours'."""
    u = (new - old @ c.T).square().sum(dim=0)
    return comm.all_reduce_sum(u, group) if side == "left" else u


def rotate_projected(low: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
    """Express projected coordinates in the new basis: ``C M`` (left) or ``M C^T`` (right)."""
    return c @ low if side == "left" else low @ c.T


@dataclass(frozen=True, eq=False)
class SvdRequest:
    """Inputs of :func:`svd_basis`."""

    g: torch.Tensor
    view: MatrixShardView
    side: str
    r: int


@dataclass(frozen=True, eq=False)
class RangeRequest:
    """Inputs of :func:`randomized_basis`."""

    g: torch.Tensor
    view: MatrixShardView
    side: str
    r: int
    oversample: int
    power_iters: int
    seed: int
    previous: torch.Tensor | None = None


def svd_basis(g: torch.Tensor, view: MatrixShardView, side: str, r: int) -> torch.Tensor:
    """Exact basis from ``torch.linalg.svd`` of the fp32 gradient (its singular vectors, signs
    included). Row-sharded: the view's owner gathers the matrix (one collective), factors it, and
    broadcasts the basis. A basis computed ahead by :func:`svd_bases` for this step is used as is."""
    return compute_basis(SvdRequest(g, view, side, r))


def svd_bases(requests: list[SvdRequest]) -> list[torch.Tensor]:
    """:func:`svd_basis` of several ``(g, view, side, r)`` at once, the owners factoring in parallel.

    Work goes in rounds that give each owner at most one matrix. The next round's gathers start
    before this round's factorizations and broadcasts, so an owner that finishes early goes on with
    its next matrix instead of waiting for the slowest, and no rank holds more than two gathered
    matrices. Every rank must pass the same requests in the same order (they depend only on names,
    shapes and the step), so the collectives line up.
    """
    queues: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        queues.setdefault(request.view.owner, []).append(i)
    rounds = [[i for i in round_ if i is not None] for round_ in itertools.zip_longest(*queues.values())]

    def start_gathers(picked: list[int]) -> Callable[[], list[torch.Tensor | None]]:
        return comm.gather_rows_async(
            [(_averaged(requests[i]), list(requests[i].view.row_counts), requests[i].view.owner, requests[i].view.group)
             for i in picked]
        )

    out: list[torch.Tensor | None] = [None] * len(requests)
    broadcasts = []
    gathering = start_gathers(rounds[0]) if rounds else None
    for j, picked in enumerate(rounds):
        assert gathering is not None  # rounds is not empty here
        fulls = gathering()
        if j + 1 < len(rounds):
            gathering = start_gathers(rounds[j + 1])
        bases = []
        for i, full in zip(picked, fulls):
            g, view, side, r = requests[i].g, requests[i].view, requests[i].side, requests[i].r
            if full is not None:
                u, _, vh = torch.linalg.svd(full, full_matrices=False)
                bases.append(vh[:r].T.contiguous() if side == "right" else u[:, :r].contiguous())
            else:
                bases.append(torch.empty((side_dim(side, view.global_shape), r), dtype=torch.float32, device=g.device))
            out[i] = bases[-1]
        broadcasts.append(comm.broadcast_async([(basis, requests[i].view.owner, requests[i].view.group) for i, basis in zip(picked, bases)]))
    for wait in broadcasts:
        wait()
    for i, request in enumerate(requests):
        if request.side == "left":
            out[i] = cast(torch.Tensor, out[i])[request.view.row_start : request.view.row_end].contiguous()
    return cast("list[torch.Tensor]", out)  # every request was in one round


def _averaged(request: SvdRequest) -> torch.Tensor:
    """The fp32 gradient of an exact refresh, averaged over the view's replicas under projected
    sync: the one full-size reduction of that mode, paid by the refreshing matrix only."""
    g, replicas = request.g.float(), request.view.replicas
    return comm.replica_mean(g.clone() if g is request.g else g, replicas) if replicas is not None else g


def compute_basis(request: SvdRequest | RangeRequest) -> torch.Tensor:
    """:func:`svd_basis` or :func:`randomized_basis` of ``request``: the basis prepared for the same
    inputs by :func:`prepared_bases`, else computed for this matrix alone."""
    entry = _prepared.pop(request.view.name, None)
    if entry is not None and _same_inputs(entry[0], request):
        return entry[1]
    if isinstance(request, SvdRequest):
        return svd_bases([request])[0]
    return lockstep.run(_range_finder(request))


_prepared: dict[str, tuple[SvdRequest | RangeRequest, torch.Tensor]] = {}


@contextmanager
def prepared_bases(requests: list[SvdRequest | RangeRequest]):
    """Compute the bases of ``requests`` together (:func:`svd_bases`, :func:`randomized_bases`);
    inside the context, :func:`svd_basis` or :func:`randomized_basis` of the same inputs returns
    its basis instead of working alone. Other inputs are computed afresh, so a wrong request only
    costs time. Whatever is not asked for is dropped on exit, so no basis outlives its step."""
    exact = [request for request in requests if isinstance(request, SvdRequest)]
    ranged = [request for request in requests if isinstance(request, RangeRequest)]
    # Each batch goes with its own function, a pairing the types cannot express.
    jobs: tuple[tuple[list[Any], Callable[[list[Any]], list[torch.Tensor]]], ...] = ((exact, svd_bases), (ranged, randomized_bases))
    for batch, compute in jobs:
        if batch:
            _prepared.update({req.view.name: (req, basis) for req, basis in zip(batch, compute(batch))})
    try:
        yield
    finally:
        _prepared.clear()


def _same_inputs(a: SvdRequest | RangeRequest, b: SvdRequest | RangeRequest) -> bool:
    if type(a) is not type(b):
        return False
    for field in fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = x is y or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                              and x.dtype == y.dtype and torch.equal(x, y))
        else:
            same = x == y
        if not same:
            return False
    return True


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
    all-gather per row orthonormalization, and a ``k x k`` all-reduce for Rayleigh-Ritz. A basis
    computed ahead by :func:`randomized_bases` for this step is used as is.
    """
    return compute_basis(RangeRequest(g, view, side, r, oversample, power_iters, seed, previous))


def randomized_bases(requests: list[RangeRequest]) -> list[torch.Tensor]:
    """:func:`randomized_basis` of several row-sharded matrices side by side: one's collectives
    overlap the others' products, and the replicated factorizations (``n x k`` QRs, stacked TSQR triangles, the
    Rayleigh-Ritz eigenproblem) are split over the ranks instead of repeated on each. Same numbers
    as one at a time. Every rank must pass the same requests in the same order."""
    return lockstep.run_together([_range_finder(request) for request in requests])


def _times(g: torch.Tensor, x: torch.Tensor, replicas=None) -> torch.Tensor:
    """``g @ x`` in fp32, averaged over ``replicas`` (projected sync: a product with the averaged
    gradient is the average of the products). A bf16 gradient is converted for this product only:
    routines of several matrices run side by side, and each holding an fp32 copy would hold them
    all at once."""
    return comm.replica_mean(g.float() @ x, replicas)


def _range_finder(request: RangeRequest) -> lockstep.Routine:
    """:func:`randomized_basis` as a :mod:`lockstep` routine."""
    g, view, side, r, previous = request.g, request.view, request.side, request.r, request.previous
    group, counts = view.group, view.row_counts
    times = partial(_times, replicas=view.replicas)
    k = min(r + request.oversample, view.m, view.n)
    n_random = k - (previous.shape[1] if previous is not None else 0)
    omega = seeded_gaussian((view.n, max(n_random, 0)), request.seed, g.device)

    def orth_rows(y):
        return orthonormalize_rows_routine(y, group, counts)

    def orth_replicated(z):  # the n x k QR every rank would repeat
        return lockstep.Owned(partial(orthonormalize, z), tuple(z.shape), z.shape[0] * k * k, group, g.device)

    if side == "right":
        # No QR of the start block: the iterates' spans, hence the Ritz vectors, do not depend on it.
        x = omega if previous is None else torch.cat([previous, omega], dim=1)
        for _ in range(request.power_iters + 1):
            y = yield from orth_rows(times(g, x))
            x = yield orth_replicated((yield lockstep.Sum(times(g.T, y), group)))
        z = times(g, x)
        gram = yield lockstep.Sum(z.T @ z, group)
        ritz = partial(_ritz_basis, gram, x, r, previous)
        return (yield lockstep.Owned(ritz, (view.n, r), view.n * k * r + k**3, group, g.device))
    y = times(g, omega)
    if previous is not None:
        y = torch.cat([previous, y], dim=1)
    y = yield from orth_rows(y)
    for _ in range(request.power_iters):
        x = yield orth_replicated((yield lockstep.Sum(times(g.T, y), group)))
        y = yield from orth_rows(times(g, x))
    z = yield lockstep.Sum(times(g.T, y), group)
    top = yield lockstep.Owned(partial(_top_ritz_vectors, z, r), (k, r), view.n * k * k + k**3, group, g.device)
    basis = y @ top
    if previous is not None:
        basis = flip_to_overlap(basis, (yield lockstep.Sum((basis * previous).sum(dim=0), group)))
    return basis.contiguous()


def _top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` eigenvectors of a symmetric ``gram``, in descending order, with canonical signs."""
    _, vecs = torch.linalg.eigh(gram.double())
    return _canonical_signs(vecs[:, -r:].flip(1)).to(gram.dtype)


def _top_ritz_vectors(z: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` eigenvectors of ``z^T z``."""
    return _top_eigenvectors(z.T @ z, r)


def _ritz_basis(gram: torch.Tensor, x: torch.Tensor, r: int, previous: torch.Tensor | None) -> torch.Tensor:
    """``x`` times the top-``r`` eigenvectors of ``gram``, sign-aligned to a replicated ``previous``."""
    basis = x @ _top_eigenvectors(gram, r).to(x.dtype)
    if previous is not None:
        basis = align_signs(basis, previous)
    return basis.contiguous()
