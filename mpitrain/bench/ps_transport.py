"""Parameter-server transport: two-sided messages vs one-sided RMA, side by side.

    python -m mpitrain.bench ps-transport [--workers 1,2] [--sizes 64K,1M,4M] [--json PATH]

One round is what a parameter-server step costs in communication: every worker pushes a
gradient of SIZE bytes (float32) to the server, the server averages the round's gradients
into new parameters, and every worker receives those parameters. Both protocols compute the
same result (checked every round):

- ``p2p`` (what ``--exchange param-server`` uses): worker ``Isend(grad)`` + ``Recv(params)``;
  the server ``Recv``s the W gradients in worker order, averages, ``Isend``s the parameters.
- ``rma``: the server exposes an accumulation buffer, a parameter buffer and a control word
  in ``Win.Allocate`` windows; a worker ``Accumulate``s its gradient (passive target,
  shared lock), bumps the arrival counter with ``Fetch_and_op``, polls the version with
  ``Get`` until the server published the round, then ``Get``s the parameters; the server
  polls its counter under a lock on its own window, averages, zeroes the buffer and bumps
  the version.

Each protocol runs in its own ``mpiexec -n W+1`` job (the last rank serves); the table gives
the median round time and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain.bench.algo import human, parse_size
from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
    from mpi4py import MPI

PROTOCOLS = ("p2p", "rma")


def _p2p_round(comm: MPI.Intracomm, server: int, grad: np.ndarray, out: np.ndarray) -> None:
    from mpi4py import MPI

    workers = comm.size - 1
    if comm.rank == server:
        acc = out
        acc[:] = 0
        for w in range(workers):  # fixed order: deterministic sums, as in the real server
            comm.Recv(grad, source=w, tag=1)
            acc += grad
        acc /= workers
        MPI.Request.Waitall([comm.Isend(acc, dest=w, tag=2) for w in range(workers)])
    else:
        req = comm.Isend(grad, dest=server, tag=1)
        comm.Recv(out, source=server, tag=2)
        req.Wait()


class RmaServer:
    """Windows of one RMA parameter server (collective to create)."""

    def __init__(self, comm: MPI.Intracomm, server: int, n: int) -> None:
        from mpi4py import MPI

        self.comm, self.server, self.n = comm, server, n
        mine = n if comm.rank == server else 0
        self.acc_win = MPI.Win.Allocate(4 * mine, 4, comm=comm)
        self.par_win = MPI.Win.Allocate(4 * mine, 4, comm=comm)
        self.ctl_win = MPI.Win.Allocate(16 if comm.rank == server else 0, 8, comm=comm)
        if comm.rank == server:
            mem: Any = (self.acc_win.tomemory(), self.par_win.tomemory(), self.ctl_win.tomemory())
            self.acc = np.frombuffer(mem[0], dtype=np.float32)
            self.par = np.frombuffer(mem[1], dtype=np.float32)
            self.ctl = np.frombuffer(mem[2], dtype=np.int64)  # arrivals, version
            self.acc[:] = 0
            self.ctl[:] = 0
        comm.Barrier()

    def free(self) -> None:
        """Collective: free the windows."""
        for w in (self.acc_win, self.par_win, self.ctl_win):
            w.Free()

    def round(self, k: int, grad: np.ndarray, out: np.ndarray) -> None:
        """One push/average/pull round ``k`` (0-based) on this rank."""
        from mpi4py import MPI

        comm, s = self.comm, self.server
        workers = comm.size - 1
        if comm.rank == s:
            while True:  # wait for round k's W arrivals
                self.ctl_win.Lock(s, MPI.LOCK_EXCLUSIVE)
                arrived = int(self.ctl[0])
                self.ctl_win.Unlock(s)
                if arrived >= workers * (k + 1):
                    break
            self.acc_win.Lock(s, MPI.LOCK_EXCLUSIVE)
            self.par_win.Lock(s, MPI.LOCK_EXCLUSIVE)
            np.divide(self.acc, workers, out=self.par)
            self.acc[:] = 0
            self.par_win.Unlock(s)
            self.acc_win.Unlock(s)
            self.ctl_win.Lock(s, MPI.LOCK_EXCLUSIVE)
            self.ctl[1] = k + 1
            self.ctl_win.Unlock(s)
            out[:] = self.par
            return
        self.acc_win.Lock(s, MPI.LOCK_SHARED)
        self.acc_win.Accumulate(grad, s, op=MPI.SUM)
        self.acc_win.Unlock(s)
        one, old = np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        self.ctl_win.Lock(s, MPI.LOCK_SHARED)
        self.ctl_win.Fetch_and_op(one, old, s, 0, op=MPI.SUM)
        self.ctl_win.Unlock(s)
        version = np.zeros(1, dtype=np.int64)
        while True:
            self.ctl_win.Lock(s, MPI.LOCK_SHARED)
            self.ctl_win.Get(version, s, target=(1, 1, MPI.INT64_T))
            self.ctl_win.Unlock(s)
            if int(version[0]) >= k + 1:
                break
        self.par_win.Lock(s, MPI.LOCK_SHARED)
        self.par_win.Get(out, s)
        self.par_win.Unlock(s)


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: time ``args.protocol`` for every size; rank 0 writes the rows as JSON."""
    from mpi4py import MPI

    server = comm.size - 1
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        n = size // 4
        grad = np.full(n, float(comm.rank + 1), dtype=np.float32)
        out = np.zeros(n, dtype=np.float32)
        want = float(sum(range(1, comm.size))) / (comm.size - 1)  # mean of workers' 1..W
        rma = RmaServer(comm, server, n) if args.protocol == "rma" else None
        times = []
        k = 0
        for rep in range(args.reps + 1):  # the first repetition warms up
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                if rma is None:
                    _p2p_round(comm, server, grad, out)
                else:
                    rma.round(k, grad, out)
                k += 1
            dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX) / args.rounds
            if rep:
                times.append(dt)
            if not np.allclose(out, want):
                raise RuntimeError(f"rank {comm.rank}: {args.protocol} gave {out[:3]}, want {want}")
        if rma is not None:
            rma.free()
        rows.append({"protocol": args.protocol, "workers": comm.size - 1, "bytes": size,
                     "round_us": statistics.median(times) * 1e6})
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    return 0


def main(argv: list[str]) -> int:
    """Run every (workers, protocol) job; print the table; optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench ps-transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts (+1 server)")
    p.add_argument("--sizes", default="64K,1M,4M", help="gradient bytes per round")
    p.add_argument("--rounds", type=int, default=50, help="rounds per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions (median)")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--protocol", choices=PROTOCOLS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    from mpitrain.runtime.launch import launch_env, mpiexec_command

    rows: list[dict[str, Any]] = []
    for w in [int(x) for x in args.workers.split(",")]:
        for proto in PROTOCOLS:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "rows.json"
                cmd = [*mpiexec_command(w + 1), sys.executable, "-m", "mpitrain.bench",
                       "ps-transport", "--worker", "--protocol", proto, "--sizes", args.sizes,
                       "--rounds", str(args.rounds), "--reps", str(args.reps), "--out", str(out)]
                proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True,
                                      timeout=900)
                if proc.returncode != 0 or not out.exists():
                    print(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    return 1
                rows += json.loads(out.read_text())
    print("parameter-server round (push gradient, average, pull parameters), us per round")
    print(f"{'workers':>7} {'size':>6} {'p2p us':>10} {'rma us':>10} {'rma/p2p':>8}")
    for w in dict.fromkeys(r["workers"] for r in rows):
        for size in dict.fromkeys(r["bytes"] for r in rows):
            got = {r["protocol"]: r["round_us"] for r in rows
                   if r["workers"] == w and r["bytes"] == size}
            print(f"{w:>7} {human(size):>6} {got['p2p']:>10.1f} {got['rma']:>10.1f} "
                  f"{got['rma'] / got['p2p']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "ps-transport", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
