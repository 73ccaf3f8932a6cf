"""Low-rank momentum with residual correction (AdaPM's debiased estimator), shard-aware.

A matrix's momentum is stored as two factors, ``L`` (``m x r``, orthonormal columns, row-sharded
like the matrix) and ``R`` (``r x n``, replicated). Each step:

1. ``m_t = (1 - beta1) G + beta1 L R`` (transient, full size);
2. ``(L, R)`` is refit so that ``L R ~ m_t``:
   - on a *refresh* step (the first step, then every ``update_proj_gap`` steps, staggered by name),
     ``L`` comes from a randomized range finder of ``m_t`` seeded by
     ``stable_seed(seed, name, refresh index)`` and warm-started from the previous ``L``; never
     from zero, where a gradient or alternating fit cannot move;
   - on the other steps, ``sweeps`` alternating-least-squares sweeps warm-started from the
     previous factors. With ``L`` kept orthonormal an ALS sweep is one subspace iteration:
     ``R <- L^T m_t``, ``L <- orth(m_t R^T)``. ``sweeps=0`` keeps ``L`` and only sets ``R``;
   - ``R <- L^T m_t`` ends every fit, so ``L R`` is the projection of ``m_t`` on ``span(L)``;
3. residual ``res = m_t - L R``; the momentum estimate is, with ``c = 1 - beta1^t`` when bias
   correction is on and ``c = 1`` otherwise,
   - ``derived``: ``L R / c + res / (1 - beta1)``. The stored error of the factors follows
     ``e_t = beta1 e_{t-1} + res_t``, so ``e_t ~ res_t (1 - beta1^t) / (1 - beta1)`` for
     stationary residuals, and ``m^full_t / c = L R / c + res_t / (1 - beta1)``;
   - ``literal``: ``m_t / c - res / (1 - beta1)``, the printed line 8 of the paper's Algorithm 1;
   - ``none``: ``L R / c``, the plain low-rank momentum.

``orth`` of a factor at least ``GRAM_MIN_WIDTH`` wide is shifted Cholesky-QR
(:func:`linalg.orthonormalize_rows_gram`), whose rank-deficient limit is safe here: the estimate
corrects the residual ``m_t - L R`` exactly whatever ``L`` is. At rank 512 on LLaMA-1B shapes the
Householder QRs were 70% of AdaPM-mini's GPU step.

Communication when row-sharded: ``L^T m_t`` is an ``r x n`` all-reduce per sweep; ``orth`` is a
TSQR (one ``r x r`` all-gather), or two ``r x r`` all-reduces by Cholesky-QR; the range finder is the one of :mod:`projector`. With ``R`` kept
in column chunks (``chunked``: each rank stores ``n/N`` of its columns), each ``L^T m_t`` is a
reduce-scatter instead, and ``R`` is all-gathered where it is used whole: the same bandwidth per
fit, plus one ``r x n`` all-gather of the stored ``R`` per step.
"""

from __future__ import annotations

import math

import torch

from . import batching, comm
from .linalg import orthonormalize, orthonormalize_rows, orthonormalize_rows_gram
from .projector import randomized_basis
from .shard import MatrixShardView

CORRECTIONS = ("derived", "literal", "none")
# Factors at least this wide are orthonormalized by Cholesky-QR, narrower ones by Householder QR
# (TSQR when sharded). On an H200, Cholesky-QR2 in fp64 takes 2.2 ms against 4.6 ms at 5461 x 528,
# but 0.72 ms against 0.3-0.6 ms at 51-74 columns, where both are latency-bound
# (``benchmarks/orth_timing.py``, ``docs/results/orth_timing_h200*.json``).
GRAM_MIN_WIDTH = 256


def orthonormal_factor(x: torch.Tensor, view: MatrixShardView) -> torch.Tensor:
    """Orthonormal columns spanning the row-sharded block ``x`` (the left factor's refit)."""
    if x.shape[1] >= GRAM_MIN_WIDTH:
        return orthonormalize_rows_gram(x, view.group)
    return orthonormalize_rows(x, view.group, view.row_counts)


def lowrank_rank(global_shape: tuple[int, int], fraction: float, rank: int | None = None) -> int:
    """The rank of the factors: ``rank`` if given, else the largest ``r`` with
    ``r (m + n) <= fraction * m n`` (the factors hold ``fraction`` of the matrix's entries); at least 1
    and at most ``min(m, n)``."""
    m, n = global_shape
    if rank is None:
        rank = math.floor(fraction * m * n / (m + n))
    return max(1, min(int(rank), m, n))


def _whole_right(right: torch.Tensor, view: MatrixShardView, chunked: bool) -> torch.Tensor:
    return comm.all_gather_cols(right, view.chunk_counts(view.n), view.group) if chunked else right


def _set_right(right: torch.Tensor, left: torch.Tensor, target: torch.Tensor, view: MatrixShardView, chunked: bool) -> None:
    """``R <- L^T m_t``, summed over the row shards (this rank's column chunk when ``chunked``)."""
    product = left.T @ target
    if chunked:
        right.copy_(comm.reduce_scatter_cols(product, view.chunk_counts(view.n), view.group))
    else:
        right.copy_(comm.all_reduce_sum(product, view.group))


def fit(
    target: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    view: MatrixShardView,
    *,
    reseed: bool,
    warm: bool,
    sweeps: int,
    seed: int,
    oversample: int,
    power_iters: int,
    chunked: bool = False,
) -> None:
    """Refit ``left @ right ~ target`` in place (local rows of ``target`` and ``left``; ``right`` whole,
    or this rank's column chunk when ``chunked``).

    ``reseed`` runs the seeded range finder, warm-started from ``left`` when ``warm`` (the factors
    already hold a fit); otherwise ``sweeps`` ALS sweeps start from the current factors.
    """
    if reseed:
        new = randomized_basis(target, view, "left", left.shape[1], oversample=oversample,
                               power_iters=power_iters, seed=seed, previous=left if warm else None)
        left.copy_(new)
    else:
        for _ in range(sweeps):
            _set_right(right, left, target, view, chunked)
            left.copy_(orthonormal_factor(target @ _whole_right(right, view, chunked).T, view))
    _set_right(right, left, target, view, chunked)


def momentum_estimates(
    grads: list[torch.Tensor],
    lefts: list[torch.Tensor],
    rights: list[torch.Tensor],
    *,
    beta1: float,
    step: int,
    bias_correction: bool,
    correction: str,
    sweeps: int,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`momentum_estimate` of several whole (one-process) matrices of one shape and rank at one
    ``step``, on a non-reseeding step, as batched products and one batched orthonormalization per
    sweep: the factors are updated in place and the estimates returned stacked (``B x m x n``).
    The same numbers as one at a time, up to the rounding of batched kernels. ``target``: the
    gradients already stacked in fp32 (``B x m x n``), overwritten with ``m_t``."""
    # Factors that are consecutive slices of one buffer (packed state) are read and written there.
    left_buf, right_buf = batching.stacked(lefts), batching.stacked(rights)
    left, right = left_buf, right_buf
    target = torch.stack([g.float() for g in grads]) if target is None else target
    target.baddbmm_(left, right, beta=1.0 - beta1, alpha=beta1)  # m_t
    orth = orthonormalize_rows_gram if left.shape[-1] >= GRAM_MIN_WIDTH else orthonormalize
    for _ in range(sweeps):
        left = orth(target @ (left.mT @ target).mT)
    right = left.mT @ target
    for stored, buffer, new in ((lefts, left_buf, left), (rights, right_buf, right)):
        if buffer.untyped_storage().data_ptr() == stored[0].untyped_storage().data_ptr():
            buffer.copy_(new)
        else:
            torch._foreach_copy_(list(stored), list(new.unbind(0)))
    return _corrected(target, left @ right, beta1=beta1, step=step, bias_correction=bias_correction,
                      correction=correction)


def momentum_estimate(
    grad: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    view: MatrixShardView,
    *,
    beta1: float,
    step: int,
    bias_correction: bool,
    correction: str,
    reseed: bool,
    sweeps: int,
    seed: int,
    oversample: int,
    power_iters: int,
    chunked: bool = False,
) -> torch.Tensor:
    """One step of low-rank momentum: update the factors in place and return the (bias-corrected)
    momentum estimate for this rank's rows. ``step`` counts from 1."""
    grad = grad.float()
    target = torch.addmm(grad, left, _whole_right(right, view, chunked), beta=1.0 - beta1, alpha=beta1)  # m_t
    fit(target, left, right, view, reseed=reseed or step == 1, warm=step > 1, sweeps=sweeps, seed=seed,
        oversample=oversample, power_iters=power_iters, chunked=chunked)
    return _corrected(target, left @ _whole_right(right, view, chunked), beta1=beta1, step=step,
                      bias_correction=bias_correction, correction=correction)


def _corrected(target: torch.Tensor, low: torch.Tensor, *, beta1: float, step: int, bias_correction: bool,
               correction: str) -> torch.Tensor:
    """The momentum estimate from ``m_t`` (``target``, overwritten) and its fit ``L R`` (``low``)."""
    c = 1.0 - beta1**step if bias_correction else 1.0
    if correction == "none":
        return low.div_(c)
    residual = target.sub_(low)
    if correction == "derived":
        return low.div_(c).add_(residual, alpha=1.0 / (1.0 - beta1))
    return low.div_(c).add_(residual, alpha=1.0 / c - 1.0 / (1.0 - beta1))  # literal: m_t/c - res/(1-beta1)
