"""Command-line dispatch: `python -m mpitrain [COMMAND] ...` (train is the default command).

This is the entry layer: the only code that touches ``MPI.COMM_WORLD``. Commands that
communicate get a duplicate of it and run under the abort-on-exception hook.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from mpitrain import __version__
from mpitrain.errors import ConfigError


class Command(NamedTuple):
    """A command: the module with its ``main()``, whether it runs under MPI, one line of help."""

    module: str
    needs_mpi: bool
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("mpitrain.train.run", True,
                     "train a model data-parallel across the MPI ranks (the default command)"),
    "config": Command("mpitrain.config_toml", False,
                      "print the resolved configuration as TOML: config --print [options]"),
    "doctor": Command("mpitrain.doctor", True,
                      "check MPI, devices, h5py and the environment on every rank"),
    "bench": Command("mpitrain.bench.__main__", False,
                     "benchmarks: all-reduce, loader, training, sharding, model parallelism"),
    "plot": Command("mpitrain.train.plot", False,
                    "plot runs' metrics.jsonl (loss, accuracy, throughput)"),
    "slurm": Command("mpitrain.slurm.cli", False, "list and render the sbatch templates"),
    "sweep-summary": Command("mpitrain.slurm.sweep", False,
                             "tabulate the runs of a Slurm sweep, best first"),
    "cluster": Command("mpitrain.cluster.cli", False,
                       "an emulated multi-node cluster on this machine (root)"),
    "trace": Command("mpitrain.timeline.cli", False, "summarise or plot a --timeline trace"),
    "checkpoint": Command("mpitrain.checkpoint.shards", False,
                          "consolidate a sharded or model-parallel checkpoint into one file"),
}

_HELP = ("-h", "--help")


def overview() -> str:
    """Return the train command's ``--help`` description: what it does and every command."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return (
        "Train a PyTorch model data-parallel across MPI ranks:\n"
        "  mpiexec -n N python -m mpitrain [options]\n"
        "With no options it trains an MLP on scikit-learn's handwritten digits.\n\n"
        f"commands (python -m mpitrain COMMAND --help):\n{rows}"
    )


def _train_help() -> int:
    """Print the train command's help without starting MPI or importing torch."""
    from mpitrain.config_args import build_parser

    build_parser("python -m mpitrain", overview()).print_help()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"mpitrain {__version__}")
        return 0
    name = args[0] if args and args[0] in COMMANDS else "train"
    rest = args[1:] if args and args[0] in COMMANDS else args
    if name == "train" and any(a in (*_HELP, "--version") for a in rest):
        return _train_help() if any(a in _HELP for a in rest) else main(["--version"])
    module_name, needs_mpi, _ = COMMANDS[name]
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
    from mpitrain.runtime.launch import select_libmpi

    select_libmpi()  # Open MPI's mpirun beside an MPICH venv (make setup installs both)

    if preempt is not None:
        return run_mpi(lambda comm: int(module.main(rest, comm, preempt=preempt)))
    return run_mpi(lambda comm: int(module.main(rest, comm)))
