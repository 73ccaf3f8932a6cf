r"""What happens to moments that live in the subspace when its basis changes.

``C = new^T old`` maps coordinates in the old basis to the new one (see ``projector``).
- ``keep``: reuse the coordinates as they are (GaLore's reference behaviour);
- ``reset``: zero the moments (SN-SM's subspace momentum);
- ``rotate``: ``M <- C M``, second moment kept (GoLore);
- ``transform``: the variance-aware map of LDAdam / SubTrack++, on bias-corrected moments (below).

``transform``, with ``c1 = 1 - beta1^t`` and ``c2 = 1 - beta2^t`` after ``t`` moment updates:

.. math::
    \begin{aligned}
    &\hat m = M / c_1,\quad \hat v = V / c_2,\quad
      \tilde m = \mathrm{clip}(\hat m, \pm\sqrt{\hat v}),\quad s = \hat v - \tilde m^2 \ (\ge 0)\\
    &M \leftarrow c_1\, C \hat m,\qquad
      V \leftarrow c_2 \big[(C\circ C)\, s + (C \tilde m)^2 + u\, \bar v\big],\qquad
      u_j = 1 - \textstyle\sum_i C_{ji}^2
    \end{aligned}

(for a right basis the coordinates are columns: ``M C^T`` and so on). Why each piece:
- The raw EMAs carry different bias factors, so the mean and the variance are formed from the
  bias-corrected ``M/c1`` and ``V/c2``; mapping raw ``V - M^2`` would shrink ``V`` at every switch.
- ``s`` is the variance of a coordinate whose mean is ``m~``: ``m~`` is the mean clipped to
  ``|m~| <= sqrt(v)``, so ``m~^2 + s = v`` exactly and ``s >= 0``. With ``C = I`` the map is the
  identity, also where the short-horizon mean exceeds the long-horizon RMS.
- ``u_j`` is the part of new coordinate ``j`` that the old basis did not span (0 when both
  bases span the same subspace). Nothing was measured there; it gets ``v_bar``, the mean of ``v``
  over the old coordinates of the same row (right) or column (left). Without it, a jump to an
  unrelated subspace (GrassJump) leaves ``V`` at about ``r/d`` of its scale while the step's
  global bias correction stays, and the next steps are several times too large.
- The reference code's extra ``(1 - beta2)`` factor on ``V`` is not applied.
"""

from __future__ import annotations

from typing import cast

import torch

from .projector import rotate_projected

MOMENT_POLICIES = ("keep", "reset", "rotate", "transform")


def check_policy(policy: str) -> str:
    if policy not in MOMENT_POLICIES:
        raise ValueError(f"moment_policy={policy!r} is not one of {MOMENT_POLICIES}")
    return policy


def apply_moment_policy(
    policy: str,
    side: str,
    c: torch.Tensor | None,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None = None,
    *,
    step: int | None = None,
    betas: tuple[float, float] | None = None,
    unseen: torch.Tensor | None = None,
) -> None:
    """Update the projected moments in place for a basis change with transition ``c``.

    ``step`` (moment updates so far, at least 1) and ``betas`` are needed by ``transform`` only;
    ``unseen`` (``u``, see :func:`~distopt.core.projector.unseen_fraction`) defaults to
    ``1 - sum_i C_ji^2``."""
    if policy == "keep":
        return
    if policy == "reset":
        for t in (exp_avg, exp_avg_sq):
            if t is not None:
                t.zero_()
        return
    # Callers pass a transition and a first moment with every policy that uses them.
    c, exp_avg = cast(torch.Tensor, c), cast(torch.Tensor, exp_avg)
    if policy == "rotate" or exp_avg_sq is None:
        exp_avg.copy_(rotate_projected(exp_avg, c, side))
        return
    check_policy(policy)
    if step is None or betas is None or step < 1:
        raise ValueError(f"moment_policy='transform' needs the number of moment updates (>= 1) and betas; got step={step}, betas={betas}")
    transform_moments(side, c, exp_avg, exp_avg_sq, step, betas, unseen)


def transform_moments(side: str, c: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                      betas: tuple[float, float], unseen: torch.Tensor | None = None) -> None:
    """The ``transform`` map of the module docstring, in place on the raw EMAs."""
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    mean = exp_avg / c1
    second = exp_avg_sq / c2
    rms = second.sqrt()
    mean_seen = torch.minimum(torch.maximum(mean, -rms), rms)
    variance = (second - mean_seen.square()).clamp_min_(0)
    weights = c.square()
    new_second = rotate_projected(variance, weights, side).add_(rotate_projected(mean_seen, c, side).square())
    if unseen is None:  # one value per new coordinate
        unseen = (1.0 - weights.sum(dim=1)).clamp_min_(0)
    if side == "left":  # coordinates are rows of an r x n moment
        new_second.addcmul_(unseen[:, None], second.mean(dim=0, keepdim=True))
    else:  # coordinates are columns of an m x r moment
        new_second.addcmul_(unseen[None, :], second.mean(dim=1, keepdim=True))
    exp_avg.copy_(rotate_projected(mean, c, side).mul_(c1))
    exp_avg_sq.copy_(new_second.mul_(c2))
