"""Scenario: rank 1 kills (or freezes) itself during a loop of allreduces.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/robust_kill.py [WATCHDOG_TIMEOUT [kill|stop]]
kill: SIGKILL; expected: mpiexec exits non-zero within 30 s (hydra notices the dead process).
stop: SIGSTOP, a rank that is alive but cannot run even its watchdog thread; expected: rank
0's watchdog fires after WATCHDOG_TIMEOUT, reports "never answered: rank 1" and aborts.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.watchdog import Watchdog


def main(comm: MPI.Intracomm) -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    how = sys.argv[2] if len(sys.argv) > 2 else "kill"
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[how]
    dog = Watchdog.create(comm, timeout)
    buf = np.ones(4096, dtype=np.float32)
    for step in range(1_000_000):
        dog.step_started(step)
        if comm.Get_rank() == 1 and step == 50:
            print(f"rank 1: SIG{how.upper()} myself at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), sig)
        dog.enter("allreduce", buf.nbytes)
        comm.Allreduce(MPI.IN_PLACE, buf)
        buf[:] = 1.0
        dog.step_done()
    dog.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
