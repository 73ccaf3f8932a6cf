"""What happens to moments that live in the subspace when its basis changes.

``C = new^T old`` maps coordinates in the old basis to the new one (see ``projector``).
- ``keep``: reuse the coordinates as they are (GaLore's reference behaviour);
- ``reset``: zero the moments (SN-SM's subspace momentum);
- ``rotate``: ``M <- C M``, second moment kept (GoLore);
- ``transform``: ``M <- C M`` and ``V <- |(C*C)(V - M^2) + (C M)^2|``, the variance-aware map of
  LDAdam / SubTrack++ (without the reference code's extra ``(1 - beta2)`` factor).
"""

from __future__ import annotations

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
) -> None:
    """Update the projected moments in place for a basis change with transition ``c``."""
    if policy == "keep":
        return
    if policy == "reset":
        for t in (exp_avg, exp_avg_sq):
            if t is not None:
                t.zero_()
        return
    old_avg = exp_avg.clone()
    exp_avg.copy_(rotate_projected(old_avg, c, side))
    if policy == "transform" and exp_avg_sq is not None:
        variance = (exp_avg_sq - old_avg.square()).clamp_min_(0)
        exp_avg_sq.copy_((rotate_projected(variance, c.square(), side) + exp_avg.square()).abs_())
