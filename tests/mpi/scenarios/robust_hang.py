"""Scenario: rank 1 sleeps inside a step while rank 0 waits in an allreduce; the watchdog aborts.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/robust_hang.py [TIMEOUT]
Expected: exit non-zero within TIMEOUT + a few seconds; output names rank 1 as late and
shows its stack (``sleepy_compute``).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.watchdog import Watchdog


def sleepy_compute(seconds: float) -> None:
    """Stand-in for a forward pass that hangs."""
    time.sleep(seconds)


def main(comm: MPI.Intracomm) -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    dog = Watchdog.create(comm, timeout)
    buf = np.ones(1024, dtype=np.float32)
    for step in range(3):
        dog.step_started(step)
        if comm.Get_rank() == 1 and step == 2:
            sleepy_compute(600)
        dog.enter("allreduce", buf.nbytes)
        comm.Allreduce(MPI.IN_PLACE, buf)
        dog.step_done()
    dog.close()
    print("not reached: the job should have been aborted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
