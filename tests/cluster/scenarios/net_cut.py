"""Scenario: a loop of all-reduces under the hang watchdog, until the test cuts or freezes a node.

Run by hand (as root, cluster up):
  python -m mpitrain cluster mpiexec -n 4 --per-node 2 -- \\
      python tests/cluster/scenarios/net_cut.py 3
then either set node 2's link down (`ip -n mpt-node2 link set mpt0 down`) or freeze its
processes (`kill -STOP $(ip netns pids mpt-node2)`). Expected: rank 0's watchdog fires after
the timeout (argument 1, seconds), names ranks 2 and 3 "never answered" and aborts the job
through the launcher: mpiexec exits 1 after timeout + grace (4.6-4.8 s for 3 s). On a cut-off
node each rank's own watchdog fires, it hears nothing from rank 0, aborts, and, its launcher
unreachable, ends itself after ``EXIT_AFTER_ABORT_S``: no process is left after timeout +
grace + 5 s + 3 s (12.6-12.9 s). A frozen node's processes stay stopped until SIGCONT or
SIGKILL.
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
from mpitrain.runtime.watchdog import Watchdog

#: stop on our own after this long (the test cuts the link within seconds)
LIMIT_S = 120.0


def main(comm: MPI.Intracomm) -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    dog = Watchdog.create(comm, timeout)
    buf = np.ones(1 << 16, dtype=np.float32)  # 256 KiB
    # one write per line: hydra may interleave the ranks' output between print()'s two writes
    sys.stdout.write(f"READY rank {comm.rank} host {socket.gethostname()} pid {os.getpid()}\n")
    sys.stdout.flush()
    comm.Barrier()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < LIMIT_S:
        dog.step_started(step)
        dog.enter("allreduce", buf.nbytes)
        comm.Allreduce(MPI.IN_PLACE, buf)
        buf[:] = 1.0
        dog.step_done()
        if comm.rank == 0 and step % 50 == 0:
            sys.stdout.write(f"step {step}\n")
            sys.stdout.flush()
        step += 1
    dog.close()
    sys.stdout.write(f"rank {comm.rank}: not reached: the job should have been aborted\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
