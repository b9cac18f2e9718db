"""Scenario: time a float32 all-reduce (mpi4py ``Allreduce``) and report its bus bandwidth.

Run by hand (as root), e.g. the measurement in docs/cluster.md:
  python -m mpitrain cluster up --nodes 2 --link 1gbit
  python -m mpitrain cluster mpiexec -n 2 -- python tests/cluster/scenarios/allreduce_time.py 16 10
Arguments: MIB (default 16), ITERS (default 10); two untimed warm-up calls come first.
Rank 0 prints ``RESULT <json>``: per-iteration times (the slowest rank's), the median, and
busbw = bytes * 2 (N - 1) / N / median in Gbit/s (nccl-tests' definition, comparable to the
link rate).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi

WARMUP = 2


def main(comm: MPI.Intracomm) -> int:
    mib = float(sys.argv[1]) if len(sys.argv) > 1 else 16.0
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    x = np.ones(int(mib * (1 << 20)) // 4, dtype=np.float32)
    times = []
    for i in range(WARMUP + iters):
        x[:] = 1.0
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, x)
        dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if i >= WARMUP:
            times.append(dt)
    if not np.all(x == comm.size):
        raise AssertionError(f"rank {comm.rank}: wrong all-reduce result")
    median = statistics.median(times)
    n = comm.size
    busbw = x.nbytes * 2 * (n - 1) / n / median * 8 / 1e9
    if comm.rank == 0:
        result = {"ranks": n, "bytes": int(x.nbytes), "iters": iters, "times_s": times,
                  "median_s": median, "busbw_gbit": busbw}  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
