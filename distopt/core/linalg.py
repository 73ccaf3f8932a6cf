"""Orthonormalization, seeded random matrices and subspace finders, shard-aware.

Matrices come in two layouts:
- *replicated*: every rank holds the whole ``d x k`` block (bases over the unsharded column dim);
- *row-sharded*: rank ``i`` holds rows ``[row_start, row_end)`` of a ``d x k`` block, the rest lives
  on ``group`` (bases over the sharded row dim, and products ``G @ X``).
Every function gives the same result, up to summation order, whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch

from . import comm, lockstep


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of ``parts``; unlike ``hash()`` it is the same in every process."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_gaussian(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian fp32 matrix drawn on the CPU, so every rank and device sees the same numbers."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def _positive_diagonal(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # QR is unique once diag(R) >= 0; this also makes QR of a Gaussian Haar-distributed.
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a replicated ``d x k`` block (d >= k), or of each block of
    a ``... x d x k`` batch."""
    q, r = torch.linalg.qr(x.float())
    return _positive_diagonal(q, r)[0]


def orthonormalize_rows(x_local: torch.Tensor, group, row_counts: tuple[int, ...]) -> torch.Tensor:
    """Orthonormalize a row-sharded ``d x k`` block with TSQR.

    Each rank factors its rows, the ``k x k`` triangles are gathered (one small all-gather), and the
    stacked triangles are factored again. Unlike Cholesky-QR it stays orthonormal for
    rank-deficient input, and needs no full-matrix gather.
    """
    return lockstep.run(orthonormalize_rows_routine(x_local, group, row_counts))


def orthonormalize_rows_routine(x_local: torch.Tensor, group, row_counts: tuple[int, ...]) -> lockstep.Routine:
    """:func:`orthonormalize_rows` as a :mod:`lockstep` routine (the stacked factorization is ``Owned``)."""
    x_local = x_local.float()
    if comm.world_size(group) == 1:
        return orthonormalize(x_local)
    k = x_local.shape[1]
    q_local, r_local = torch.linalg.qr(x_local)  # (rows, min(rows,k)), (min(rows,k), k)
    r_padded = r_local.new_zeros((k, k))
    r_padded[: r_local.shape[0]] = r_local
    stacked = (yield lockstep.Gather(r_padded, group)).reshape(-1, k)
    q_top = yield lockstep.Owned(partial(orthonormalize, stacked), tuple(stacked.shape), stacked.shape[0] * k * k,
                                 group, x_local.device)
    me = comm.rank(group)
    block = q_top[me * k : me * k + r_local.shape[0]]
    return q_local @ block


def orthonormalize_rows_gram(x_local: torch.Tensor, group=None, passes: int = 2) -> torch.Tensor:
    """Orthonormalize a row-sharded ``d x k`` block by shifted Cholesky-QR in fp64, ``passes`` times.

    Each pass: ``A = X^T X`` summed over the ranks (one ``k x k`` all-reduce, no QR of the rows),
    ``U = chol(A + s I)`` with ``s = 1e-12 tr(A)``, ``X <- X U^{-1}``. Where ``X`` has full numerical
    rank this is the QR factor with a positive diagonal, as :func:`orthonormalize` gives (the first
    pass leaves an error of about ``cond(X)^2 * 1e-16``, the second removes it). The shift keeps the
    factorization finite on any input: an exactly zero column stays zero, and ``Q^T Q <= I`` up to
    rounding, so ``Q Q^T`` never amplifies. On an H200 (``benchmarks/orth_timing.py``) it is 1.4-2.1x
    faster than Householder QR for one 528-column block and 6-10x for a batch of narrow ones, but
    slower for one narrow block (both latency-bound). AdaPM's factor refit uses it: its estimate
    corrects the residual ``m_t - L R`` exactly whatever ``L`` is.
    """
    x = x_local.double()  # a batch of blocks (``... x d x k``) is orthonormalized block by block
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(passes):
        gram = comm.all_reduce_sum(x.mT @ x, group)
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        shift = 1e-12 * trace + torch.finfo(x.dtype).tiny  # tiny: X = 0 gives Q = 0, not NaN
        upper = torch.linalg.cholesky_ex(gram + shift * eye, upper=True)[0]
        x = torch.linalg.solve_triangular(upper, x, upper=True, left=False)
    return x.float()


def haar_basis(d: int, r: int, seed: int, device) -> torch.Tensor:
    """A uniformly random (Haar) ``d x r`` orthonormal basis, identical on every rank."""
    return orthonormalize(seeded_gaussian((d, r), seed, device))


def align_signs(new: torch.Tensor, old: torch.Tensor, group=None) -> torch.Tensor:
    """Flip columns of ``new`` so each has a non-negative overlap with the same column of ``old``.

    Singular vectors are defined up to sign; aligning them keeps a 'keep' moment policy from
    reading last period's momentum with flipped signs after a refresh.
    """
    return flip_to_overlap(new, comm.all_reduce_sum((new * old).sum(dim=0), group))


def flip_to_overlap(new: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """``new`` with the columns of negative ``overlap`` (see :func:`align_signs`) negated."""
    signs = torch.where(overlap < 0, -torch.ones_like(overlap), torch.ones_like(overlap))
    return new * signs


def energy_fraction(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """Share of ``||G||_F^2`` captured by projecting onto ``basis`` (one process, for tests)."""
    captured = basis.T @ g if side == "left" else g @ basis
    return float(captured.norm() ** 2 / g.norm() ** 2)
