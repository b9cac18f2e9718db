"""Scenario: a loop of all-reduces that runs until the test kills every rank of one node.

Run by hand (as root, cluster up):
  python -m mpitrain cluster mpiexec -n 4 --per-node 2 -- \\
      python tests/cluster/scenarios/node_loss.py
then kill the ranks of one node (`ip netns pids mpt-node2`); expected: the job ends within 30 s
with a non-zero exit and hydra's report names that node ("RUNNING AT mpt-node2").
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

#: stop on our own after this long (the test kills ranks within seconds)
LIMIT_S = 120.0


def main(comm: MPI.Intracomm) -> int:
    buf = np.ones(1 << 18, dtype=np.float32)  # 1 MiB
    # one write per line: unbuffered print() writes the newline separately, and hydra may
    # interleave the ranks' output between the two
    sys.stdout.write(f"READY rank {comm.rank} host {socket.gethostname()} pid {os.getpid()}\n")
    sys.stdout.flush()
    comm.Barrier()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < LIMIT_S:
        comm.Allreduce(MPI.IN_PLACE, buf)
        buf[:] = 1.0
        if comm.rank == 0 and step % 20 == 0:
            sys.stdout.write(f"step {step}\n")
            sys.stdout.flush()
        step += 1
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
