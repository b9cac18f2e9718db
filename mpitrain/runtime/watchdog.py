"""Hang watchdog: abort the job, naming the late ranks, when a step or phase takes too long.

Steps are timed against ``timeout`` (``--hang-timeout``). Phases that do I/O (opening the
data, loading the checkpoint to resume from, writing a checkpoint) are timed separately
against the longer ``io_timeout`` (``--io-timeout``), so a slow but healthy checkpoint write
is not killed as a hung step; the report names the phase that stalled.

Every rank runs a daemon thread. When this rank's step has been armed for longer than the
timeout, the thread prints this rank's Python stacks (faulthandler, all threads) and its
last entered phases, asks every other rank to do the same (a message on the watchdog's own
duplicate communicator, so even a rank whose timer is not armed reports), and sends its
state to rank 0. Rank 0 waits a grace period, prints a table naming the late ranks (those
that entered fewer collectives than the most advanced ranks) and the ranks that never
answered, then calls ``Abort(1)``. Other ranks abort by themselves when rank 0 stays silent.
Every abort is :func:`mpitrain.runtime.abort.abort_job`: it aborts ``MPI_COMM_WORLD`` through
the launcher, and a rank that is still running a few seconds later (its node cut off from the
launcher) ends its own process with exit code 1. Ranks on a cut-off node end that way after
their own watchdogs fire, since their collectives never complete.

The thread keeps running while the main thread sleeps in Python or blocks inside MPI
(mpi4py releases the GIL), so a rank stuck in ``time.sleep`` prints its own stack.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpitrain.runtime import ulfm
from mpitrain.runtime.abort import abort_job
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI

#: tags on the watchdog's own communicator
TAG_REQUEST = 71
TAG_REPORT = 72
#: how many phases each rank remembers
RING = 16


@dataclass(frozen=True)
class RankState:
    """What one rank reports when its watchdog fires (or is asked to)."""

    rank: int
    host: str
    step: int
    armed: bool
    phase: str  # last entered phase ("" when none)
    nbytes: int
    seconds_in_phase: float
    entered: int  # phases entered since start (ranks in the same collective agree)
    stack: str = ""  # main thread's innermost frames, "fn (file:line) <- caller ..."


@dataclass(frozen=True)
class Verdict:
    """Which ranks hold the job up."""

    late: list[int]  # answered, but behind the most advanced ranks
    missing: list[int]  # never answered
    waiting: list[int]  # inside the collective the others have not reached
    phase: str  # that collective's name


def late_ranks(reports: Mapping[int, RankState | None], size: int) -> Verdict:
    """Decide which ranks are late from the reports of ``size`` ranks (pure function).

    Ranks in the same collective have entered the same number of phases; ranks that entered
    fewer are late (still computing, sleeping or stuck before it). Ranks without a report are
    missing (dead, or stuck where their watchdog thread cannot run).
    """
    got = {r: s for r, s in reports.items() if s is not None}
    missing = [r for r in range(size) if r not in got]
    if not got:
        return Verdict([], missing, [], "")
    top = max(s.entered for s in got.values())
    waiting = sorted(r for r, s in got.items() if s.entered == top)
    late = sorted(r for r, s in got.items() if s.entered < top)
    return Verdict(late, missing, waiting, got[waiting[0]].phase)


def format_table(
    reports: Mapping[int, RankState | None], size: int, timeout: float, verdict: Verdict
) -> str:
    """Return rank 0's report: one row per rank, then the verdict line."""
    lines = [f"watchdog: a step did not complete within {timeout:g} s; state of {size} ranks:"]
    lines.append(f"  {'rank':>4}  {'host':<16} {'step':>6}  {'entered':>7}  last phase (s since)")
    for r in range(size):
        s = reports.get(r)
        if s is None:
            lines.append(f"  {r:>4}  {'?':<16} {'?':>6}  {'?':>7}  NO ANSWER")
            continue
        phase = f"{s.phase} {s.nbytes} B" if s.phase else "(none)"
        mark = "  <- LATE" if r in verdict.late else ""
        lines.append(
            f"  {r:>4}  {s.host[:16]:<16} {s.step:>6}  {s.entered:>7}  "
            f"{phase} ({s.seconds_in_phase:.1f}s){mark}"
        )
        if s.stack:
            lines.append(f"        main thread in: {s.stack}")
    parts = []
    if verdict.late:
        who = ", ".join(f"rank {r}" for r in verdict.late)
        ranks_waiting = ",".join(map(str, verdict.waiting))
        parts.append(f"late: {who} (not inside '{verdict.phase}' where ranks {ranks_waiting} wait)")
    if verdict.missing:
        parts.append("never answered: " + ", ".join(f"rank {r}" for r in verdict.missing))
    if not parts:
        parts.append(
            f"all ranks are inside '{verdict.phase}'; none is late in Python "
            "(suspect the MPI library, the network or a process outside Python)"
        )
    lines.append("watchdog: " + "; ".join(parts) + ". Aborting the job (exit 1).")
    return "\n".join(lines) + "\n"


def stack_summary(thread_id: int | None, depth: int = 4) -> str:
    """Return ``fn (file:line) <- caller (file:line) ...`` for a thread's innermost frames."""
    if thread_id is None:
        return ""
    frame = sys._current_frames().get(thread_id)
    parts: list[str] = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
        frame = frame.f_back
    return " <- ".join(parts)


class Watchdog:
    """Background thread that aborts the job when a step hangs; see the module docstring."""

    def __init__(
        self,
        comm: MPI.Intracomm,
        timeout: float,
        *,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        abort: Callable[[int], None] | None = None,
        poll: float | None = None,
        io_timeout: float | None = None,
    ) -> None:
        """Wrap an already duplicated ``comm``; use :meth:`create` (it dups and starts)."""
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = float(timeout)
        self.io_timeout = float(io_timeout) if io_timeout is not None else self.timeout
        self.enabled = self.timeout > 0 or self.io_timeout > 0
        self.phase = "step"  # what the armed timer times: "step" or an I/O phase's name
        self.limit = self.timeout
        self.mpi_in_thread = True  # create() checks the thread level
        self.grace = grace if grace is not None else min(5.0, max(1.0, self.timeout / 2))
        self.clock = clock
        self._abort = abort if abort is not None else functools.partial(abort_job, comm)
        self.poll = poll if poll is not None else max(0.05, min(0.5, self.timeout / 10))
        self.host = socket.gethostname()
        self.main_ident = threading.get_ident()  # the thread that runs the steps
        self.started_at: float | None = None
        self.ring: deque[tuple[float, str, int]] = deque(maxlen=RING)
        self.entered = 0
        self.step = -1
        self.deadline: float | None = None
        self.fired = threading.Event()
        self._any = -1  # MPI.ANY_SOURCE, set in the thread (importing here would init MPI)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpitrain-watchdog", daemon=True)

    @classmethod
    def create(
        cls,
        comm: MPI.Intracomm,
        timeout: float,
        *,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        abort: Callable[[int], None] | None = None,
        poll: float | None = None,
        io_timeout: float | None = None,
    ) -> Watchdog:
        """Collective: duplicate ``comm`` for the watchdog's traffic and start its thread.

        ``io_timeout`` limits the phases armed with :meth:`guard` ``(io=True)`` (default: the
        step ``timeout``). Both ``<= 0`` turn the watchdog off (the duplicate is still made,
        so every rank performs the same collectives). Below ``MPI_THREAD_MULTIPLE`` the thread
        makes no MPI calls except the final ``Abort``: each rank then reports only its own state.
        """
        from mpi4py import MPI

        dog = cls(
            derived(comm.Dup()), timeout, grace=grace, clock=clock, abort=abort, poll=poll,
            io_timeout=io_timeout,
        )
        dog.mpi_in_thread = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        if not dog.mpi_in_thread and dog.rank == 0 and dog.enabled:
            sys.stderr.write(
                "mpitrain: warning: MPI thread level is below MULTIPLE: the hang watchdog "
                "cannot ask other ranks for their state; each rank reports only its own\n"
            )
        if dog.enabled:
            dog._thread.start()
        return dog

    @classmethod
    def off(cls, comm: MPI.Intracomm) -> Watchdog:
        """Return a watchdog that never fires and starts no thread (not collective)."""
        return cls(comm, 0.0, io_timeout=0.0)

    # --- called by the training loop (main thread) ---
    def step_started(self, step: int) -> None:
        """Arm the timer for ``step`` (the step limit)."""
        self.step = step
        self._arm("step", self.timeout)

    def _arm(self, phase: str, limit: float) -> None:
        self.phase, self.limit = phase, limit
        if not self.enabled or limit <= 0:
            self.deadline = None
            return
        now = self.clock()
        self.started_at = now
        self.deadline = now + limit

    @contextlib.contextmanager
    def guard(self, phase: str, *, io: bool = False) -> Iterator[None]:
        """Time ``phase`` (outside a step) against the I/O limit (``io``) or the step limit."""
        self._arm(phase, self.io_timeout if io else self.timeout)
        self.enter(phase, 0)
        try:
            yield
        finally:
            self.step_done()

    def step_done(self) -> None:
        """Disarm the timer."""
        self.deadline = None
        self.started_at = None

    def enter(self, name: str, nbytes: int = 0) -> None:
        """Record that this rank enters a collective or phase (kept in a ring of 16)."""
        self.entered += 1
        self.ring.append((self.clock(), name, nbytes))

    def close(self) -> None:
        """Stop the thread (not collective; safe to call twice)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # --- the thread ---
    def state(self) -> RankState:
        """Return this rank's state now."""
        now = self.clock()
        recent = list(self.ring)  # one C-level copy: the main thread may append meanwhile
        if recent:
            t, name, nbytes = recent[-1]
        else:
            t, name, nbytes = now, "", 0
        return RankState(
            self.rank,
            self.host,
            self.step,
            self.deadline is not None,
            name,
            nbytes,
            now - t,
            self.entered,
            stack_summary(self.main_ident),
        )

    def _run(self) -> None:
        from mpi4py import MPI

        self._any = MPI.ANY_SOURCE
        while not self._stop.wait(self.poll):
            deadline = self.deadline
            if deadline is not None and self.clock() > deadline:
                self._fire(initiator=True)
                return
            try:
                asked = (self.mpi_in_thread and self.size > 1
                         and self.comm.Iprobe(source=self._any, tag=TAG_REQUEST))
                if asked:
                    self.comm.recv(source=self._any, tag=TAG_REQUEST)
            except MPI.Exception as exc:  # a peer died: --on-rank-loss shrink recovers
                if ulfm.recoverable(exc):
                    return  # the training thread sees it too; a new watchdog follows
                raise
            if asked:
                self._fire(initiator=False)
                return

    def _dump(self, why: str) -> None:
        out = sys.stderr
        started = self.started_at
        if started is not None:
            what = f"step {self.step}" if self.phase == "step" else self.phase
            out.write(
                f"rank {self.rank}: watchdog: {what} has run "
                f"{self.clock() - started:.1f} s (limit {self.limit:g} s)\n"
            )
        else:
            out.write(f"rank {self.rank}: watchdog: between steps (last step {self.step})\n")
        ring = "\n".join(
            f"    {name} {nbytes} B ({self.clock() - t:.1f}s ago)"
            for t, name, nbytes in list(self.ring)
        )
        from mpitrain.runtime.comm_thread import live_threads

        threads = "".join(f"    {t.describe()}\n" for t in live_threads())
        out.write(
            f"watchdog rank {self.rank}/{self.size} on {self.host}: {why}; step {self.step}; "
            f"last phases (oldest first):\n{ring or '    (none)'}\n{threads}"
            f"watchdog rank {self.rank}: Python stacks of all threads:\n"
        )
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()

    def _fire(self, initiator: bool) -> None:
        self.fired.set()
        if not initiator:
            why = "another rank's watchdog fired"
        elif self.phase == "step":
            why = f"step not done within {self.limit:g} s (--hang-timeout)"
        else:
            limit = "--io-timeout" if self.limit == self.io_timeout else "--hang-timeout"
            why = f"{self.phase} not done within {self.limit:g} s ({limit})"
        self._dump(why)
        if not self.mpi_in_thread:
            sys.stderr.write(f"watchdog rank {self.rank}: aborting the job (exit 1)\n")
            sys.stderr.flush()
            self._abort(1)
            return
        pending = []
        if initiator:
            pending += [
                self.comm.isend(self.step, dest=r, tag=TAG_REQUEST)
                for r in range(self.size)
                if r != self.rank
            ]
        if self.rank != 0:
            pending.append(self.comm.isend(self.state(), dest=0, tag=TAG_REPORT))
            # rank 0 normally aborts everyone; abort alone if it stays silent
            self._stop.wait(self.grace + 5.0)
            sys.stderr.write(
                f"watchdog rank {self.rank}: rank 0 did not end the job; aborting from here "
                "(rank 0 may be the late one)\n"
            )
            sys.stderr.flush()
            self._abort(1)
            return
        reports: dict[int, RankState | None] = {0: self.state()}
        end = time.monotonic() + self.grace
        while time.monotonic() < end and len(reports) < self.size:
            if self.comm.Iprobe(source=self._any, tag=TAG_REPORT):
                s: RankState = self.comm.recv(source=self._any, tag=TAG_REPORT)
                reports[s.rank] = s
            else:
                time.sleep(0.02)
        verdict = late_ranks(reports, self.size)
        sys.stderr.write(format_table(reports, self.size, self.timeout, verdict))
        sys.stderr.flush()
        del pending
        self._abort(1)
