"""Every exchange mode with default flags trains the demo (issue 13; run with 5 ranks).

Runs ``mpitrain.train.run.main`` with nothing but ``--exchange MODE`` (and, for the parameter
server, ``--max-staleness τ``) on sub-communicators of COMM_WORLD, so torch loads once:
double-buffer and local-sgd on 2 and 4 ranks; param-server on 1 server + 2 and 4 workers
(τ = 0), and on 1 + 2 and 1 + 4 with τ = 2 and 4. Prints one PASS/FAIL line per run with the
test accuracy: >= 95% for the defaults, >= 93% with τ raised. Ranks not in a run wait in a
sleeping non-blocking barrier (a spinning one would take the 2 cores from the runs).

    mpiexec -n 5 python tests/mpi/scenarios/modes_defaults.py [WORKDIR] [NAME ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from mpitrain.runtime.abort import abort_job, run_mpi

#: name -> (ranks, flags, required test accuracy)
RUNS: dict[str, tuple[int, list[str], float]] = {
    "double-buffer-n2": (2, ["--exchange", "double-buffer"], 0.95),
    "double-buffer-n4": (4, ["--exchange", "double-buffer"], 0.95),
    "local-sgd-n2": (2, ["--exchange", "local-sgd"], 0.95),
    "local-sgd-n4": (4, ["--exchange", "local-sgd"], 0.95),
    "param-server-w2": (3, ["--exchange", "param-server"], 0.95),
    "param-server-w4": (5, ["--exchange", "param-server"], 0.95),
    "param-server-w2-tau2": (3, ["--exchange", "param-server", "--max-staleness", "2"], 0.93),
    "param-server-w2-tau4": (3, ["--exchange", "param-server", "--max-staleness", "4"], 0.93),
    "param-server-w4-tau2": (5, ["--exchange", "param-server", "--max-staleness", "2"], 0.93),
    "param-server-w4-tau4": (5, ["--exchange", "param-server", "--max-staleness", "4"], 0.93),
}


def wait_sleeping(world: MPI.Intracomm) -> None:
    """Collective: a barrier that sleeps while it waits."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


def main(world: MPI.Intracomm) -> int:
    from mpitrain.train.run import main as train_main

    assert world.size == 5, "run with 5 ranks"
    args = sys.argv[1:]
    shared = world.bcast(args[0] if args else tempfile.mkdtemp(), root=0)
    names = args[1:] or list(RUNS)
    work = Path(shared)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in names:
        ranks, flags, need = RUNS[name]
        sub = world.Split(0 if world.rank < ranks else MPI.UNDEFINED, world.rank)
        summary = work / name / "summary.json"
        if sub != MPI.COMM_NULL:
            code = train_main(
                [*flags, "--no-progress", "--log-level", "warning", "--summary-json",
                 str(summary)],
                sub,
            )
            if code != 0:
                print(f"FAIL {name}: exit {code}", flush=True)
                abort_job(world, 1)
            sub.Free()
        wait_sleeping(world)
        if world.rank == 0:
            acc = float(json.loads(summary.read_text())["test_accuracy"])
            verdict = "PASS" if acc >= need else "FAIL"
            print(f"{verdict} {name} {' '.join(flags)}: test accuracy {100 * acc:.2f}% "
                  f"(need {100 * need:.0f}%)", flush=True)
    wait_sleeping(world)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
