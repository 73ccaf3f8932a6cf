"""Orthonormalization, seeded random matrices and subspace finders, shard-aware.

Matrices come in two layouts:
- *replicated*: every rank holds the whole ``d x k`` block (bases over the unsharded column dim);
- *row-sharded*: rank ``i`` holds rows ``[row_start, row_end)`` of a ``d x k`` block, the rest lives
  on ``group`` (bases over the sharded row dim, and products ``G @ X``).
Every function gives the same result, up to summation order, whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
import math
import os
from functools import partial
from typing import TypeVar

import torch

from . import comm, lockstep


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of ``parts``; unlike ``hash()`` it is the same in every process."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# Draw every sketch with the CPU generator and copy it, on any device: the same numbers on a GPU as
# on a CPU, for comparing the two (``DISTOPT_CPU_SKETCHES=1``).
CPU_SKETCHES = os.environ.get("DISTOPT_CPU_SKETCHES", "0") == "1"
_MASK32 = 0xFFFFFFFF
_Bits = TypeVar("_Bits", int, torch.Tensor)


def seeded_gaussian(shape: tuple[int, ...], seed: int, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Gaussian fp32 matrix, the same on every rank: drawn by torch's CPU generator on a CPU, by
    :func:`counter_gaussian` on the device elsewhere (no host draw and copy per refresh). torch's
    device generators are not used: they spread a draw over a grid sized by the GPU's multiprocessor
    count, so ranks on two GPU models (or MIG slices) would draw different sketches from one seed."""
    device = torch.device(device if device is not None else "cpu")
    if device.type in ("cpu", "mps") or CPU_SKETCHES:  # mps: no fp64 for the counter draw's transforms
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    return counter_gaussian(shape, seed, device)


def _mix32(x: _Bits) -> _Bits:
    """A bijective avalanche of 32-bit values (ints, or held in an int64 tensor). The multipliers are below 2**31, so no
    product reaches 2**63: integer overflow, undefined in the kernels, never happens."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x27D4EB2F) & _MASK32
    return x ^ (x >> 16)


def counter_gaussian(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian fp32 ``shape`` tensor from a counter-based hash: element pair ``j`` is Box-Muller of
    the hashes of counters ``j`` and ``half + j`` keyed by the 64-bit ``seed``. Integer ops are exact
    and the transforms run in fp64 before rounding to fp32, so every device gives the same numbers,
    whatever its kernel grid (up to a last-bit difference of fp64 ``log``/``cos`` surviving rounding)."""
    numel = math.prod(shape)
    if 2 * ((numel + 1) // 2) > 1 << 32:
        raise ValueError(f"counter_gaussian draws at most 2**32 values per call; asked for {tuple(shape)}")
    half = (numel + 1) // 2
    # Keys hashed from the seed: a raw small seed would put the mixer's fixed point (0 -> 0, u = 2**-32)
    # at a small counter, a few sigma out in every draw.
    first_key = _mix32(_mix32((seed & _MASK32) ^ 0x5BD1E995) ^ ((seed >> 32) & _MASK32))
    second_key = _mix32(first_key ^ 0x3C6EF372)
    counters = torch.arange(2 * half, dtype=torch.int64, device=device)
    bits = _mix32(_mix32(counters ^ first_key) ^ second_key).double()
    radius = bits[:half].add_(1.0).mul_(2.0**-32).log_().mul_(-2.0).sqrt_()  # u in (0, 1]: finite log
    angle = bits[half:].mul_(2.0 * math.pi * 2.0**-32)
    values = torch.cat([radius * angle.cos(), radius * angle.sin()])
    return values[:numel].float().view(shape)


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
