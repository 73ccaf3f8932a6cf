"""The training job's entry script: ``torchrun --nproc_per_node 2 launch/train.py --config ...``.

The job itself is :mod:`distopt.job.train` (also ``distopt train`` and ``python -m distopt.job.train``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not installed

from distopt.job.train import main, skip_teardown_under_live_threads  # noqa: E402

if __name__ == "__main__":
    sys.exit(skip_teardown_under_live_threads(main()))
