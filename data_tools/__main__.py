"""`python -m data_tools`: the entry point (owns COMM_WORLD; also runs without mpiexec)."""

from __future__ import annotations

import sys

from data_tools.cli import main
from mpitrain.runtime.abort import run_mpi

if __name__ == "__main__":
    sys.exit(run_mpi(lambda comm: main(sys.argv[1:], comm)))
