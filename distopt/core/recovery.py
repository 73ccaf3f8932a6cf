"""Recovery scaling: a full-rank update for the part of the gradient a subspace discards.

Fira's rule, also used by SubTrack++, GrassWalk and GrassJump. For a matrix with gradient ``G``,
projected gradient ``R`` and Adam's projected direction ``N`` (both ``r``-dimensional along the
projected side):

- residual ``D = G - back(R)``, the component of ``G`` outside the subspace;
- per-channel ratio ``phi = ||N|| / (||R|| + 1e-8)``, the norm taken over the projected dimension:
  one value per row for a right basis (``R`` is ``m x r``), per column for a left one (``r x n``);
- scaled residual ``D_hat = phi * D`` (broadcast along the projected side);
- norm-growth limiter: if ``||D_hat||_F > gamma * ||D_hat_prev||_F`` it is rescaled to
  ``gamma * ||D_hat_prev||_F``; the norm kept for the next step is the one after limiting.

The ratio is row-local for a right basis and column-local for a left one, so on row shards only
the Frobenius norm needs a collective (one scalar all-reduce); with the left side's ``R`` and ``N``
in column chunks (``state_layout="partitioned"``), ``R`` and the ratio are all-gathered too.
"""

from __future__ import annotations

import math

import torch

from . import batching, comm
from .options import check_option
from .projector import add_back, project_back
from .shard import MatrixShardView

RATIO_EPS = 1e-8


def check_recovery_hparams(group: dict) -> None:
    check_option(group, "recovery_scaling", "bool")
    check_option(group, "norm_growth_limit", low=1, high=math.inf, note="1.01 in Fira; math.inf disables it")


def recovery_term(
    grad: torch.Tensor,
    low: torch.Tensor,
    direction: torch.Tensor,
    basis: torch.Tensor,
    side: str,
    view: MatrixShardView,
    last_norm: torch.Tensor,
    limit: float,
    *,
    columns_chunked: bool = False,
) -> torch.Tensor:
    """The limited, scaled residual ``D_hat`` (this rank's rows); updates ``last_norm`` in place.

    ``last_norm`` is a 0-d fp32 state tensor; 0 means "no previous step", and the first residual
    is then taken as it is (Fira records its norm without limiting it).
    """
    ratio = channel_ratio(low, direction, side)
    if columns_chunked:  # this rank holds some columns of the left side's R and N: gather R and the ratio
        both = comm.all_gather_cols(torch.cat([low, ratio[None]]), view.chunk_counts(view.n), view.group)
        low, ratio = both[:-1], both[-1]
    scaled = scaled_residual(grad, low, ratio, basis, side)
    norm = comm.all_reduce_sum(scaled.square().sum(), view.group).sqrt()
    return limited(scaled, norm, last_norm, limit)


def channel_ratio(low: torch.Tensor, direction: torch.Tensor, side: str, batch_dims: int = 0) -> torch.Tensor:
    """``phi = ||N|| / (||R|| + eps)`` per row (right basis) or per column (left basis), of one matrix
    or, with ``batch_dims=1``, of each matrix of a stacked batch."""
    dim = (1 if side == "right" else 0) + batch_dims
    return _norms(direction, dim).div_(_norms(low, dim).add_(RATIO_EPS))


def _norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norms along ``dim``: torch's vector norm (one op) along the innermost dimension (a
    right side's); sqrt(sum(x^2)) along any other, where on CPU the vector norm ran 10-25x slower."""
    if dim == x.dim() - 1:
        return torch.linalg.vector_norm(x, dim=dim)
    return x.square().sum(dim).sqrt_()


def scaled_residual(grad: torch.Tensor, low: torch.Tensor, ratio: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``phi * (G - back(R))`` for this rank's rows, from the whole ``R`` and ratio along ``n``."""
    residual = grad - project_back(low, basis, side)
    return residual * (ratio.unsqueeze(1) if side == "right" else ratio.unsqueeze(0))


def scaled_residual_(grads: torch.Tensor, low: torch.Tensor, ratio: torch.Tensor, basis: torch.Tensor, side: str,
                     basis_t: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`scaled_residual` of a stacked batch ``(k, rows, n)``, written over ``grads`` (fp32):
    one ``baddbmm`` for ``G - back(R)``, one multiply by the ratios ``(k, rows)`` or ``(k, n)``."""
    add_back(grads, low, basis, side, alpha=-1.0, basis_t=basis_t)
    return grads.mul_(ratio.unsqueeze(2 if side == "right" else 1))


def limited_batch_(scaled: torch.Tensor, norms: torch.Tensor, last_norms: torch.Tensor, limit: float,
                   coefs: list[float]) -> torch.Tensor:
    """:func:`limited` of a stacked batch ``(k, rows, n)`` given its ``k`` Frobenius ``norms``, times
    ``coefs`` (one per matrix), in place; ``last_norms`` (``(k,)``) become the limited norms."""
    factor = limit_factor(norms, last_norms, limit)
    # One coefficient for the batch (the usual case) is a scalar: no tensor made, nor copied to the device.
    coef = batching.per_matrix(coefs, factor, 1)
    return scaled.mul_(factor.mul_(coef).view(-1, 1, 1))


def limited(scaled: torch.Tensor, norm: torch.Tensor, last_norm: torch.Tensor, limit: float) -> torch.Tensor:
    """``scaled`` after the norm-growth limiter, given its whole Frobenius ``norm``; updates ``last_norm``."""
    return scaled * limit_factor(norm, last_norm, limit)


def limit_factor(norm: torch.Tensor, last_norm: torch.Tensor, limit: float) -> torch.Tensor:
    """The norm-growth limiter's factor for Frobenius norms ``norm`` (element-wise: one matrix, or a
    batch of them against their ``last_norm``); ``last_norm`` becomes the limited norm."""
    # min(1, cap / norm), with no cap where there is no previous norm (0): the factor is 1 exactly
    # unless norm > cap, as in Fira's rule.
    cap = (last_norm * limit).masked_fill_(last_norm == 0, math.inf)
    factor = torch.div(cap, norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max_(1.0)
    torch.mul(norm, factor, out=last_norm)
    return factor
