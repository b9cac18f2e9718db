"""Scenario: rank 1 kills itself with SIGKILL during a loop of allreduces.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/robust_kill.py [WATCHDOG_TIMEOUT]
Expected: mpiexec exits non-zero within 30 s (the launcher notices the dead process; the
watchdog, armed with WATCHDOG_TIMEOUT, is the fallback when a launcher does not).
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.watchdog import Watchdog


def main() -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    comm = MPI.COMM_WORLD.Dup()
    dog = Watchdog.create(comm, timeout)
    buf = np.ones(4096, dtype=np.float32)
    for step in range(1_000_000):
        dog.step_started(step)
        if comm.Get_rank() == 1 and step == 50:
            print("rank 1: SIGKILL myself", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        dog.enter("allreduce", buf.nbytes)
        comm.Allreduce(MPI.IN_PLACE, buf)
        buf[:] = 1.0
        dog.step_done()
    dog.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
