"""When each matrix refreshes its subspace.

A matrix refreshes on its first step and then whenever ``(step + phase) % gap == 0``, where
``step`` counts the optimizer steps it has taken. With ``stagger`` the phase is a stable hash of
the parameter name, so matrices spread their refreshes over the gap instead of all refreshing on
the same step; without it the phase is 0 and refreshes land on steps 0, gap, 2*gap (GaLore's rule).
"""

from __future__ import annotations

import functools

from .linalg import stable_seed


@functools.lru_cache(maxsize=1 << 16)  # hashed once per matrix, not on every step
def refresh_phase(name: str, gap: int, stagger: bool) -> int:
    return stable_seed("phase", name) % gap if stagger else 0


def refresh_residue(gap: int, phase: int) -> int:
    """The residue modulo ``gap`` of the steps after the first on which a matrix of ``phase`` refreshes."""
    return -phase % gap


def is_refresh_step(step: int, gap: int, phase: int) -> bool:
    return step == 0 or step % gap == refresh_residue(gap, phase)


def refresh_index(step: int, gap: int, phase: int) -> int:
    """How many refreshes happened before ``step``; seeds the random parts of the next one."""
    if step <= 0:
        return 0
    # step 0, plus every s in [1, step) with (s + phase) % gap == 0
    return 1 + (step - 1 + phase) // gap - phase // gap


def last_refresh_step(step: int, gap: int, phase: int) -> int:
    """The latest refresh step ``<= step`` of :func:`is_refresh_step` (0, the first step, if none)."""
    candidate = step - (step + phase) % gap
    return candidate if candidate >= 1 else 0
