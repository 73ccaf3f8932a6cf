"""distopt: sharding-aware subspace optimizers (the GaLore family) for FSDP2 and DeepSpeed."""

from .api import build_optimizer, list_optimizers, name_parameters, pack_weights
from .optim import AdamW, GaLore, SubspaceOptimizer, state_bytes

__version__ = "0.1.0"

__all__ = ["AdamW", "GaLore", "SubspaceOptimizer", "build_optimizer", "list_optimizers", "name_parameters", "pack_weights",
           "state_bytes"]
