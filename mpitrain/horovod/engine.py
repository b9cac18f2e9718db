"""The Horovod engine: every Horovod collective is agreed, then run, in submission order.

A queued collective runs on one :class:`~mpitrain.runtime.comm_thread.CommThread` per
``hvd.init()`` (as Horovod's background thread): the thread agrees up to ``BATCH`` queued
operations of one process set per round (:mod:`mpitrain.horovod.negotiate`), then moves
each one's data (blocking, on the thread) while the caller computes. A collective that runs
*at the call* agrees there and returns with its transfer in flight, moved by later waits
(the path before the engine). Which one, by how the caller goes on (``call``) and the
``progress`` setting:

============================  =======================  ======================  ========
call                          ``auto`` (default)       ``thread``              ``poll``
============================  =======================  ======================  ========
``ASYNC`` (``*_async``)       queued                   queued                  at call
``WAIT`` (blocking calls)     at call if none queued   at call if none queued  at call
``STEP`` (optimizer buckets)  at call if none queued   queued                  at call
============================  =======================  ======================  ========

``auto`` is measured (docs/benchmarks.md, "Horovod API on the engine"): on the 2-core test
machine the thread's hand-offs cost more than it hides, as for DataParallel
(``--comm-progress auto`` = poll), so the optimizer's buckets stay at the call while the
``*_async`` calls are queued, which Horovod's semantics need (they return at once).
``thread`` and ``auto`` need ``MPI_THREAD_MULTIPLE``; ``auto`` falls back to ``poll``
with a warning where MPI does not give it.

Order: one FIFO per process, so every rank must submit the same collectives in the same
order (as with any MPI collective); Horovod's coordinator would instead match queued
tensors by name. A different order is an error on every rank (the first operations that
differ are reported, by name), never a hang. A name in flight is refused at once, on the
calling rank only (``ValueError``), before anything is queued.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain.comm.handle import Handle
from mpitrain.horovod import context as _c
from mpitrain.horovod.cache import DEFAULT_CAPACITY, ResponseCache
from mpitrain.horovod.exceptions import HorovodInternalError, shut_down_message
from mpitrain.horovod.handles import Op
from mpitrain.horovod.negotiate import (
    BAD,
    BATCH,
    OK,
    WIDTH,
    Request,
    decide,
    exchange,
    explain,
    joined_request,
    row,
)
from mpitrain.runtime.comm_thread import CommThread, CommThreadError, ThreadHandle

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.horovod.context import Context, ProcessSet

PROGRESS = ("auto", "thread", "poll")
ASYNC, WAIT, STEP = "async", "wait", "step"  #: how the caller goes on (module docstring)
DUPLICATE = ("Requested to perform an operation on a tensor with the same name as another "
             "tensor that is currently being processed. If you want to request another "
             "tensor, use a different tensor name.")
UNSUPPORTED = "is not supported by hvd."
NOT_CONTIGUOUS = "Tensor is required to be contiguous."
#: local problems raised as Horovod's ValueError (on every rank, after the agreement)
VALUE_ERRORS = (UNSUPPORTED, NOT_CONTIGUOUS)


@dataclass(frozen=True)
class Outcome:
    """What the ranks agreed for one operation."""

    joined: tuple[int, ...] = ()
    request: Request | None = None  # the active ranks' request (what joined ranks mirror)


AGREED = Outcome()  #: no rank joined


Start = Callable[["MPI.Intracomm", Outcome], tuple[Handle, Callable[[], Any]]]


@dataclass(eq=False)
class Pending:
    """One submitted collective: its request, how to start it and, once run, its result."""

    ps: ProcessSet
    req: Request
    start: Start
    local_error: str | None
    what: str
    settled: bool = False
    outcome: Outcome = AGREED
    error: BaseException | None = None
    finish: Callable[[], Any] | None = None


@dataclass(eq=False)
class SetState:
    """Per-process-set bookkeeping: rounds (the join order needs them) and the cache."""

    cache: ResponseCache = field(default_factory=ResponseCache)
    rounds: int = 0


def resolve_progress(progress: str) -> str:
    """Return the mode for ``progress``: itself, or ``poll`` for ``auto`` without
    ``MPI_THREAD_MULTIPLE`` (``thread`` without it raises ValueError)."""
    from mpi4py import MPI

    if progress not in PROGRESS:
        raise ValueError(f"progress must be 'auto', 'thread' or 'poll', got {progress!r}")
    if progress == "poll" or MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
        return progress
    if progress == "thread":
        raise ValueError("progress='thread' needs MPI_THREAD_MULTIPLE, which this MPI did not "
                         "give. HINT: use progress='poll', or let mpi4py ask for 'multiple' "
                         "(mpi4py.rc.thread_level)")
    warnings.warn("mpitrain.horovod: MPI gave no MPI_THREAD_MULTIPLE; collectives agree on "
                  "the calling thread (progress='poll')", stacklevel=3)
    return "poll"


def polite_exchange(comm: MPI.Intracomm, mine: np.ndarray) -> np.ndarray:
    """:func:`~mpitrain.horovod.negotiate.exchange` that waits by testing with short sleeps:
    a round mostly waits for the peers to reach it, and a busy MPI wait would take the core
    the caller computes on meanwhile."""
    rows = np.empty((comm.size, WIDTH), dtype=np.int64)
    req = comm.Iallgather(mine, rows)
    pause = 0.0
    while not req.Test():
        time.sleep(pause)
        pause = min(2e-4, pause * 2 + 1e-5)
    return rows


class Engine:
    """One process's queue of Horovod collectives (see the module docstring).

    Args:
        ctx: the context made by ``hvd.init()``.
        progress: ``thread``, ``poll`` or ``auto``.
        cache_capacity: signatures each process set's response cache keeps (0: none).
    """

    def __init__(self, ctx: Context, progress: str = "auto",
                 cache_capacity: int = DEFAULT_CAPACITY) -> None:
        self.ctx = ctx
        self.progress = resolve_progress(progress)
        if cache_capacity < 0:
            raise ValueError(f"cache_capacity must be >= 0, got {cache_capacity}")
        self.cache_capacity = cache_capacity
        self.thread: CommThread | None = None
        self._queue: deque[Pending] = deque()  # submitted, not yet settled (FIFO)
        self._last: ThreadHandle | None = None

    def new_state(self) -> SetState:
        """Return the bookkeeping of a newly registered process set."""
        return SetState(ResponseCache(self.cache_capacity))

    # ---- the calling thread ----------------------------------------------------------------
    def submit(self, ps: ProcessSet | None, req: Request, start: Start,
               local_error: str | None = None, *, call: str = ASYNC) -> Op:
        """Collective over ``ps``: agree on ``req``, then ``start`` the data movement, queued
        or at the call (``call``: see the module docstring).

        Raises at once, on this rank alone: ValueError for a set this rank is not in or a
        name in flight; Horovod's shut-down error once some rank has shut down.
        """
        ctx = self.ctx
        what = f"hvd.{req.kind}" + (f" '{req.name}'" if req.name else "")
        comm = ctx.comm_of(ps, f"hvd.{req.kind}")
        ctx.raise_if_down(what)
        self._raise_if_failed()
        if req.name is not None and req.name in ctx.in_flight:
            raise ValueError(f"rank {ctx.world.rank}: {DUPLICATE}")  # as Horovod's queue
        tl = ctx.timeline
        span = (f"hvd.{req.kind} {req.name or ''}".rstrip(), tl.now()) if tl.on else None
        job = Pending(_c.global_process_set if ps is None else ps, req, start, local_error,
                      what)
        if self._at_call(call):
            self.settle([job])
            if job.error is not None:
                if isinstance(job.error, ValueError):
                    raise job.error
                return Op(error=job.error)
            inner, finish = job.start(comm, job.outcome)
            op = Op(inner, finish, name=req.name, span=span)
        else:
            self._queue.append(job)
            handle = self._on_thread().submit(lambda: self._run(job, comm), what)
            self._last = handle
            op = Op(handle, name=req.name, span=span, source=job)
        if req.name is not None:
            ctx.in_flight[req.name] = id(op)
        return op

    def _at_call(self, call: str) -> bool:
        if self.progress == "poll":
            return True
        if call == ASYNC or (call == STEP and self.progress == "thread"):
            return False
        return self.idle()  # nothing queued: the thread is off MPI, order is kept

    def idle(self) -> bool:
        """Return whether everything queued has run (the thread is off MPI)."""
        return self._last is None or self._last.done()

    def drain(self) -> None:
        """Wait until everything queued has run (raises if the thread failed)."""
        if self._last is not None:
            self._last.wait()

    def configure(self, progress: str | None, cache_capacity: int | None) -> None:
        """Drain, then switch the progress mode and/or empty the caches with a new capacity."""
        self.drain()
        if progress is not None:
            self.progress = resolve_progress(progress)
        if cache_capacity is not None:
            if cache_capacity < 0:
                raise ValueError(f"cache_capacity must be >= 0, got {cache_capacity}")
            self.cache_capacity = cache_capacity
            for state in self.ctx.states.values():
                state.cache = ResponseCache(cache_capacity)

    def close(self) -> None:
        """Run what is queued, then stop the thread (not collective)."""
        if self.thread is not None:
            self.thread.close()
            self.thread, self._last = None, None

    def _on_thread(self) -> CommThread:
        if self.thread is None:
            self.thread = CommThread(self.ctx.world.rank, "horovod")
            self.thread.timeline = self.ctx.timeline
        return self.thread

    def _raise_if_failed(self) -> None:
        failed = None if self.thread is None else self.thread.first_error
        if failed is not None:  # the thread stopped: nothing more can be agreed
            failed.collected = True
            raise CommThreadError(self.thread.failure_line(failed))  # type: ignore[union-attr]

    # ---- the communication thread --------------------------------------------------------
    def _run(self, job: Pending, comm: MPI.Intracomm) -> None:
        if not job.settled:
            self.settle(self._batch(), on_thread=True)
        if job.error is None:
            inner, job.finish = job.start(comm, job.outcome)
            inner.wait()  # a transfer moves while MPI polls: the thread stays inside MPI

    def _batch(self) -> list[Pending]:
        """The queue's first operations that one round may agree: one process set, none
        locally invalid after the first, at most BATCH."""
        q = self._queue
        batch = [q[0]]
        if batch[0].local_error is None:
            for i in range(1, min(len(q), BATCH)):
                j = q[i]
                if j.ps is not batch[0].ps or j.local_error is not None:
                    break
                batch.append(j)
        return batch

    # ---- either thread ---------------------------------------------------------------------
    def settle(self, batch: list[Pending], on_thread: bool = False) -> None:
        """Collective over the batch's set: run one round; settle its first operations.

        Sets each settled operation's outcome or error (the same on every rank) and
        updates the set's response cache; the rest are offered again in the next round.
        """
        ctx = self.ctx
        ps = batch[0].ps
        if ctx.down is not None:  # some rank shut down: nothing more is agreed
            for j in batch:
                j.error = HorovodInternalError(shut_down_message(ctx.down, ctx.world.rank,
                                                                 j.what))
            self._settled(batch)
            return
        state = ctx.state_of(ps)
        ctl = ctx.control_of(ps)
        cache = state.cache
        state.rounds += 1
        head = batch[0]
        entries = [cache.entry(j.req) for j in batch]
        mine = row(OK if head.local_error is None else BAD, 0, state.rounds, entries)
        rows = polite_exchange(ctl, mine) if on_thread else exchange(ctl, mine)
        rnd = decide(rows)
        if rnd.shutdown is not None:
            ctx.learn(ps, rnd.shutdown, head.what)
            self.settle(batch)  # now with ctx.down set: each gets the shut-down error
            return
        done = batch[:rnd.consumed]
        agreed = done[:-1] if rnd.failed else done
        if rnd.joined and agreed:  # one operation per round while some rank has joined
            request, err = joined_request(ctl, rows, rnd.entries[0], head.req, cache.request)
            if err is not None:
                head.error = HorovodInternalError(err)
            head.outcome = Outcome(joined=rnd.joined, request=request)
        elif not rnd.joined:
            for j, entry in zip(agreed, rnd.entries, strict=True):
                cache.agreed(j.req, entry)
        if rnd.failed:
            failed = done[-1]
            msg = explain(ctl, failed.req, failed.local_error)
            cache.evict(rnd.stale)
            failed.error = (ValueError(msg) if any(m in msg for m in VALUE_ERRORS)
                            else HorovodInternalError(msg))
        self._settled(done)

    def _settled(self, done: list[Pending]) -> None:
        for j in done:
            j.settled = True
        q = self._queue
        while q and q[0].settled:
            q.popleft()
