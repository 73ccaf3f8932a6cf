"""The ``distopt`` command: ``train``, ``compare``, ``memory``, ``torchrun`` and ``list``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

USAGE = """usage: distopt <command> [arguments]

commands:
  train     pretrain a LLaMA model with a distopt optimizer (single process, torchrun, srun, mpirun)
  compare   run several optimizers on the same model, data and token budget; plot and tabulate
  memory    per-rank memory of model x optimizer x engine x world size x precision
  torchrun  torchrun that exits 143 after a SIGTERM and gives the ranks time to checkpoint
  list      the optimizers distopt provides

`distopt <command> --help` describes each one.
"""


def list_optimizers() -> int:
    import distopt
    from distopt.optim import REGISTRY

    width = max(len(n) for n in distopt.list_optimizers())
    for name in distopt.list_optimizers():
        doc = (REGISTRY[name].__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")
    return 0


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    run: Callable[[list[str] | None], int | None]
    if command == "train":
        from distopt.job.train import main as run
    elif command == "compare":
        from distopt.job.compare import main as run
    elif command == "memory":
        from distopt.job.memory_cli import main as run
    elif command == "torchrun":
        from distopt.job.torchrun import main as run
    elif command == "list":
        return list_optimizers()
    elif command in ("--version", "version"):
        import distopt

        print(distopt.__version__)
        return 0
    else:
        import difflib

        close = difflib.get_close_matches(command, ["train", "compare", "memory", "torchrun", "list"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"distopt: unknown command {command!r}.{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    code = run(rest)
    if command == "train":
        from distopt.job.train import skip_teardown_under_live_threads

        return skip_teardown_under_live_threads(code or 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
