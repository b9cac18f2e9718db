"""Scenario: the communication thread (``--comm-progress thread``, issue 24).

    mpiexec -n 2|4 python tests/mpi/scenarios/comm_thread.py equal
        DataParallel through ThreadReducer == the blocking path bit for bit (flat, staged,
        fp16 compression), == the non-blocking path within rtol 1e-5 (its sums may run in
        another order); prints PASS lines.
    mpiexec -n 2 python tests/mpi/scenarios/comm_thread.py fail|uncollected|stuck
        rank 1's transport raises inside the thread (the main thread waits / never waits), or
        rank 1 never joins (the watchdog names the thread's operation): the job ends.
    python tests/mpi/scenarios/comm_thread.py level
        with MPI_THREAD_SERIALIZED, --comm-progress thread is refused (one line).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import mpi4py

if len(sys.argv) > 1 and sys.argv[1] == "level":
    mpi4py.rc.thread_level = "serialized"

import torch
from mpi4py import MPI

from mpitrain.comm.reducer import FlatReducer
from mpitrain.comm.staged import StagedReducer
from mpitrain.comm.threaded import ThreadReducer, resolve_progress
from mpitrain.errors import ConfigError
from mpitrain.grad import DataParallel
from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.comm_thread import CommThread
from mpitrain.runtime.watchdog import Watchdog


def train(comm: MPI.Intracomm, reducer: Any, hook: str = "none") -> list[torch.Tensor]:
    """Eight SGD-momentum steps of a seeded MLP, 1 MiB buckets (several per step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    dp = DataParallel(model, comm=comm, bucket_mb=0.1, hook=hook, reducer=reducer)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1 + comm.rank)
    for _ in range(8):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(dp(x), y).backward()
        dp.synchronize()
        opt.step()
    dp.close()
    return [p.detach().clone() for p in model.parameters()]


def equal(comm: MPI.Intracomm) -> None:
    def flat(overlap: bool) -> FlatReducer:
        return FlatReducer(comm.Dup(), overlap=overlap)

    for name, make, hook in (
        ("flat", lambda: flat(False), "none"),
        ("staged", lambda: StagedReducer(flat(False)), "none"),
        ("fp16 compression", lambda: flat(False), "fp16"),
    ):
        ref = train(comm, make(), hook)
        threaded = ThreadReducer(make(), comm.rank)
        got = train(comm, threaded, hook)
        assert threaded.thread.submitted > 8, threaded.thread.submitted  # buckets, each step
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), name
        if comm.rank == 0:
            print(f"PASS thread == blocking {name} {comm.size}", flush=True)
    nonblocking = train(comm, flat(True))
    got = train(comm, ThreadReducer(flat(False), comm.rank))
    for a, b in zip(nonblocking, got, strict=True):
        # another MPI algorithm may sum in another order: rounding noise, not a 2x (no average)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if comm.rank == 0:
        print(f"PASS thread == non-blocking {comm.size}", flush=True)


class Broken(FlatReducer):
    """Rank 1's transport fails on its third call."""

    calls = 0

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        type(self).calls += 1
        if self.comm.rank == 1 and self.calls == 3:
            raise OSError("injected transport failure")
        super().allreduce_(t, average=average)


def fail(comm: MPI.Intracomm, collect: bool) -> None:
    thread = ThreadReducer(Broken(comm.Dup(), overlap=False), comm.rank)
    thread.thread.abort_after = 1.0
    t = torch.ones(16)
    handles = [thread.iallreduce_(t, average=False) for _ in range(5)]
    if collect or comm.rank == 0:
        for handle in handles:
            handle.wait()
    else:
        time.sleep(60)  # never collects: the thread's own timer must end the job
    print("not reached: the job should have been aborted", flush=True)


def stuck(comm: MPI.Intracomm) -> None:
    dog = Watchdog.create(comm, 3.0)
    dog.step_started(0)
    thread = ThreadReducer(FlatReducer(comm.Dup(), overlap=False), comm.rank)
    if comm.rank == 1:
        time.sleep(60)  # never joins the all-reduce rank 0's thread is in
    thread.iallreduce_(torch.ones(16), average=False).wait()
    print("not reached: the watchdog should have fired", flush=True)


def level() -> None:
    assert MPI.Query_thread() < MPI.THREAD_MULTIPLE, MPI.Query_thread()
    try:
        resolve_progress("thread")
    except ConfigError as exc:
        assert "MPI_THREAD_MULTIPLE" in str(exc) and "\n" not in str(exc), exc
        print("PASS thread level refused", flush=True)
    else:
        raise AssertionError("--comm-progress thread was not refused")
    ct = CommThread(0, "unit")
    ct.close()
    try:
        ct.submit(lambda: None, "late")
    except Exception as exc:
        assert "after close()" in str(exc)
        print("PASS submit after close refused", flush=True)


def main(comm: MPI.Intracomm) -> int:
    what = sys.argv[1]
    if what == "equal":
        equal(comm)
    elif what in ("fail", "uncollected"):
        fail(comm, collect=what == "fail")
    elif what == "stuck":
        stuck(comm)
    else:
        level()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
