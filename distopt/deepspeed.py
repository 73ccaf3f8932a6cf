"""DeepSpeed ZeRO-1/2/3 with distopt optimizers named in the JSON config.

    engine, optimizer, _, scheduler = distopt.deepspeed.initialize(model=model, config="configs/ds/zero2_galore.json")

with ``"optimizer": {"type": "distopt.galore", "params": {...}}`` in the config. See
:mod:`distopt.engines.deepspeed` for the mechanism, and ``python -m distopt.deepspeed convert`` to
resume a checkpoint on another data-parallel size.
"""

from __future__ import annotations

import sys

from .engines.deepspeed import (
    attach,
    build_partitioned_optimizer,
    convert_checkpoint,
    initialize,
    load_full_state,
    main,
    saved_dp_world_size,
)

__all__ = ["attach", "build_partitioned_optimizer", "convert_checkpoint", "initialize", "load_full_state",
           "saved_dp_world_size"]

if __name__ == "__main__":
    sys.exit(main())
