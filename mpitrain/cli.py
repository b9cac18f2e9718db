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
    "cluster": ("mpitrain.cluster.cli", False),
    "trace": ("mpitrain.timeline.cli", False),
    "checkpoint": ("mpitrain.checkpoint_shards", False),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args and args[0] in COMMANDS else "train"
    rest = args[1:] if args and args[0] in COMMANDS else args
    module_name, needs_mpi = COMMANDS[name]
    preempt = None
    if name == "train":
        # before torch is imported: a preemption signal from now on is recorded, not fatal
        from mpitrain.preempt import DEFAULT_SIGNALS, PreemptFlag, parse_signals

        preempt = PreemptFlag(parse_signals(DEFAULT_SIGNALS)).install()
    try:
        module = importlib.import_module(module_name)
        if not needs_mpi:
            return int(module.main(rest))
    except ConfigError as exc:
        sys.stderr.write(f"mpitrain: error: {exc}\n")
        return exc.exit_code
    from mpitrain.runtime.abort import run_mpi

    if preempt is not None:
        return run_mpi(lambda comm: int(module.main(rest, comm, preempt=preempt)))
    return run_mpi(lambda comm: int(module.main(rest, comm)))
