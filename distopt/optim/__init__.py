"""One file per algorithm; the registry maps public names to classes."""

from __future__ import annotations

from .adam_mini import AdamMini
from .adamw import AdamW
from .adapm import AdaPM
from .adapm_mini import AdaPMMini
from .base import SubspaceOptimizer, state_bytes
from .galore import GaLore
from .golore import GoLore
from .grassjump import GrassJump
from .grasswalk import GrassWalk
from .rso import RSO
from .sam import SAM
from .snsm import AdamSNSM
from .subtrack import SubTrack

# One entry per algorithm file; keep the names stable, they are public (build_optimizer, JSON configs).
REGISTRY: dict[str, type[SubspaceOptimizer]] = {
    "adam-mini": AdamMini,
    "adamw": AdamW,
    "adapm": AdaPM,
    "adapm-mini": AdaPMMini,
    "galore": GaLore,
    "golore": GoLore,
    "grassjump": GrassJump,
    "grasswalk": GrassWalk,
    "rso": RSO,
    "sam": SAM,
    "snsm": AdamSNSM,
    "subtrack": SubTrack,
}

__all__ = ["REGISTRY", "AdamW", "GaLore", "SubspaceOptimizer", "state_bytes"]
