"""`python -m data_tools`: the entry point (owns COMM_WORLD; also runs without mpiexec)."""

from __future__ import annotations

import sys

from mpi4py import MPI

from data_tools.cli import main
from mpitrain.runtime.abort import install_excepthook

if __name__ == "__main__":
    comm = MPI.COMM_WORLD.Dup()
    install_excepthook(comm)
    sys.exit(main(sys.argv[1:], comm))
