"""Scenario: an exception in a background thread of rank 1 aborts the job (no hang).

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/robust_thread_exc.py
Expected: exit 1 within seconds, "rank 1/2 on HOST: unhandled exception" and the traceback.
The watchdog is armed with 60 s so that only the excepthook can end the job in time.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.watchdog import Watchdog


def prefetch_worker() -> None:
    """Stand-in for a data-loader / metrics thread that fails."""
    raise OSError("injected read failure in a background thread")


def main(comm: MPI.Intracomm) -> int:
    dog = Watchdog.create(comm, 60.0)
    buf = np.ones(16, dtype=np.float32)
    dog.step_started(0)
    if comm.Get_rank() == 1:
        t = threading.Thread(target=prefetch_worker, name="prefetch")
        t.start()
        t.join()
        threading.Event().wait(60)  # the main thread would otherwise carry on or wait
    dog.enter("allreduce", buf.nbytes)
    comm.Allreduce(MPI.IN_PLACE, buf)
    print("not reached: the job should have been aborted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
