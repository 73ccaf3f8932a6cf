"""Moving an orthonormal basis along geodesics of the Grassmannian, shard-aware.

A basis ``S`` is a ``d x r`` block with orthonormal columns, either replicated (``group=None``) or
row-sharded over ``group`` (a left basis under FSDP2). A tangent direction at ``S`` is a ``d x r``
block ``H`` with ``S^T H = 0``; with its thin SVD ``H = U diag(s) V^T`` the geodesic from ``S`` is

    S(t) = S V cos(t s) V^T + U sin(t s) V^T + S (I - V V^T),

which stays orthonormal and whose principal angles to ``S`` are ``t s_i`` (while ``t s_i <= pi/2``),
so its geodesic distance from ``S`` is ``t ||s||_2``. Used by GrassWalk (random tangent) and
SubTrack (rank-1 tangent of the subspace estimation error).
"""

from __future__ import annotations

import torch

from . import comm
from .linalg import orthonormalize, orthonormalize_rows


def tangent_projection(basis: torch.Tensor, x: torch.Tensor, group) -> torch.Tensor:
    """``(I - S S^T) X``: the component of ``X`` orthogonal to the span of ``S``."""
    return x - basis @ comm.all_reduce_sum(basis.T @ x, group)


def thin_svd(x: torch.Tensor, group, row_counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``X = U diag(s) V^T`` of a ``d x k`` block (``d >= k``), replicated or row-sharded.

    TSQR gives ``X = Q R`` without gathering rows; the ``k x k`` factor is decomposed on every rank
    alike. ``U`` comes back with this rank's rows; ``s`` (descending) and ``V`` are replicated.
    """
    q = orthonormalize_rows(x, group, row_counts)
    small = comm.all_reduce_sum(q.T @ x, group)
    uu, s, vh = torch.linalg.svd(small.double())
    return q @ uu.to(q.dtype), s.to(x.dtype), vh.T.to(x.dtype)


def geodesic_step(basis: torch.Tensor, u: torch.Tensor, angles: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``S V cos(A) V^T + U sin(A) V^T + S (I - V V^T)`` for principal angles ``A`` (length ``k``).

    ``u`` (``d x k``, orthonormal, orthogonal to ``basis``) and ``basis`` share a row layout; ``v``
    (``r x k``, orthonormal columns) is replicated. Row-local: no communication.
    """
    vt = v.T
    return basis + (basis @ v) @ ((torch.cos(angles) - 1).unsqueeze(1) * vt) + u @ (torch.sin(angles).unsqueeze(1) * vt)


def retract(basis: torch.Tensor, group, row_counts: tuple[int, ...]) -> torch.Tensor:
    """Re-orthonormalize a basis that is orthonormal up to round-off (QR with a positive diagonal).

    For an exactly orthonormal input this returns it unchanged, so it only removes the drift that
    repeated geodesic steps accumulate in fp32.
    """
    if group is None:
        return orthonormalize(basis)
    return orthonormalize_rows(basis, group, row_counts)


def principal_angles(a: torch.Tensor, b: torch.Tensor, group=None) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of two orthonormal ``d x r`` blocks."""
    cosines = torch.linalg.svdvals(comm.all_reduce_sum(a.T.double() @ b.double(), group))
    return torch.arccos(cosines.clamp(-1.0, 1.0))
