"""Tiny MPI job for the Slurm tests: rank 0 writes {"world_size", "ranks"} to argv[1]."""

from __future__ import annotations

import json
import sys

from mpi4py import MPI


def main() -> int:
    """Gather host/rank facts and write them as JSON from rank 0."""
    comm = MPI.COMM_WORLD
    ranks = comm.gather(comm.rank, root=0)
    if comm.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": comm.size, "ranks": ranks}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
