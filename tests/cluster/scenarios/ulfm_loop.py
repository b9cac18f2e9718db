"""Scenario: a loop of all-reduces that shrinks to the survivors when ranks are lost (ULFM).

Run by hand (as root, cluster up, Open MPI installed by make setup):
  python -m mpitrain cluster mpiexec --ulfm -n 4 --per-node 2 -- \\
      python tests/cluster/scenarios/ulfm_loop.py
then kill node 2's ranks (``kill -9`` of the pids its READY lines name): the survivors print
"rank R: lost 2 of 4, continuing on 2" and go on until the time limit; or set node 2's link
down (``ip -n mpt-node2 link set mpt0 down``): PRRTE loses its daemon there and ends the
whole job within ~5 s, the survivors never get to shrink (docs/cluster.md).
Each rank prints "READY rank R host H pid P" once; rank 0 prints "step S" now and then.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi

#: stop on our own after this long (the tests act within seconds)
LIMIT_S = 60.0


def main(comm: MPI.Intracomm) -> int:
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    buf = np.ones(1 << 16, dtype=np.float32)  # 256 KiB
    size = comm.size
    # one write per line, so that the launcher does not interleave the ranks' lines
    sys.stdout.write(f"READY rank {comm.rank} host {socket.gethostname()} pid {os.getpid()}\n")
    sys.stdout.flush()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < LIMIT_S:
        try:
            comm.Allreduce(MPI.IN_PLACE, buf)
        except MPI.Exception:
            comm.Revoke()
            comm = comm.Shrink()
            sys.stdout.write(f"rank {comm.rank}: lost {size - comm.size} of {size}, "
                             f"continuing on {comm.size}\n")
            sys.stdout.flush()
            size = comm.size
        buf[:] = 1.0
        if comm.rank == 0 and step % 100 == 0:
            sys.stdout.write(f"step {step}\n")
            sys.stdout.flush()
        step += 1
        time.sleep(0.002)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
