"""One file per algorithm; the registry maps public names to classes."""

from __future__ import annotations

from .adamw import AdamW
from .base import SubspaceOptimizer, state_bytes
from .galore import GaLore

# One entry per algorithm file; keep the names stable, they are public (build_optimizer, JSON configs).
REGISTRY: dict[str, type[SubspaceOptimizer]] = {
    "adamw": AdamW,
    "galore": GaLore,
}

__all__ = ["REGISTRY", "AdamW", "GaLore", "SubspaceOptimizer", "state_bytes"]
