"""torchrun for distopt jobs: ``distopt torchrun [torchrun arguments]`` (or ``python -m distopt.job.torchrun``).

It takes torchrun's arguments and runs torchrun, with two changes for jobs that a scheduler stops:

- **Exit code.** Stopped by a signal (SIGTERM from ``kill``, ``scancel`` or a preemption), torchrun
  passes it to the ranks, which write a checkpoint after the current step and exit 143, but torchrun
  itself then raises, prints a traceback and exits 1, which wrappers and schedulers read as a crash.
  Here it exits ``128 + signal``, 143 for SIGTERM, as the job does on one process.
- **Time to checkpoint.** After a signal torchrun waits ``--shutdown-timeout`` seconds (30 by
  default) before it kills the ranks, which may cut off the checkpoint of a large model (the previous
  one stays intact: checkpoints are written atomically). Here the default is
  :data:`SHUTDOWN_TIMEOUT_S` unless ``--shutdown-timeout`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says
  otherwise; torch releases without the option keep their 30 s, with a warning.

    distopt torchrun --nproc_per_node 8 launch/train.py --config configs/runs/llama_1b.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHUTDOWN_TIMEOUT_S = 300
TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
logger = logging.getLogger("distopt")


def _supports_shutdown_timeout() -> bool:
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}


def shutdown_timeout_env(argv: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment torchrun should see: :data:`SHUTDOWN_TIMEOUT_S` as its shutdown timeout,
    unless the arguments or the environment already set one (torchrun reads it from there)."""
    given = any(a.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in argv)
    if given or TIMEOUT_ENV in environ or "PET_SHUTDOWN_TIMEOUT" in environ:
        return {}
    return {TIMEOUT_ENV: str(SHUTDOWN_TIMEOUT_S)}


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.run import parse_args, run

    if _supports_shutdown_timeout():
        os.environ.update(shutdown_timeout_env(argv, os.environ))
    elif not argv or argv[0] not in ("-h", "--help"):
        print("distopt torchrun: this torch release gives the ranks 30 s after a SIGTERM to write their "
              "checkpoint before it kills them (torch with --shutdown-timeout lets them take longer)", file=sys.stderr)

    @record  # as torchrun's own main: a failed rank is reported the same way
    def launch(args) -> int:
        try:
            run(args)
        except SignalException as stop:
            code = 128 + int(stop.sigval)
            print(f"distopt torchrun: stopped by {stop.sigval.name}; the ranks were asked to checkpoint and "
                  f"stop (exit {code})", file=sys.stderr, flush=True)
            return code
        return 0

    return launch(parse_args(argv))  # None where the launch exits 0 through SystemExit (torch's @record)


if __name__ == "__main__":
    sys.exit(main())
