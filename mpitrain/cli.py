"""Command-line dispatch: `python -m mpitrain [COMMAND] ...` (train is the default command).

This is the entry layer: the only code that touches ``MPI.COMM_WORLD``. Commands that
communicate get a duplicate of it and run under the abort-on-exception hook.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from mpitrain.errors import ConfigError

#: command -> (module with main(), needs MPI)
COMMANDS: dict[str, tuple[str, bool]] = {
    "train": ("mpitrain.train.run", True),
    "doctor": ("mpitrain.doctor", True),
    "bench": ("mpitrain.bench.__main__", False),
    "plot": ("mpitrain.train.plot", False),
    "slurm": ("mpitrain.slurm.cli", False),
    "sweep-summary": ("mpitrain.slurm.sweep", False),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args and args[0] in COMMANDS else "train"
    rest = args[1:] if args and args[0] in COMMANDS else args
    module_name, needs_mpi = COMMANDS[name]
    module = importlib.import_module(module_name)
    if not needs_mpi:
        return int(module.main(rest))
    from mpi4py import MPI

    from mpitrain.runtime.abort import abort, install_excepthook

    comm = MPI.COMM_WORLD.Dup()
    install_excepthook(comm)
    try:
        return int(module.main(rest, comm))
    except ConfigError as exc:
        # resolved from the same flags/env/file on every rank: each rank exits on its own
        if comm.rank == 0:
            sys.stderr.write(f"mpitrain: error: {exc}\n")
        return exc.exit_code
    except SystemExit:
        raise
    except BaseException as exc:
        abort(comm, exc)
        return 1
