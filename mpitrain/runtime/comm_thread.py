"""A communication thread: queued communication runs, in submission order, off the main thread.

MPI moves a non-blocking collective only while some thread is inside MPI; over a network
without an MPI progress thread the buckets launched during backward wait for the main
thread's next MPI call (docs/cluster.md). Horovod and PyTorch's ``ProcessGroupMPI`` instead
run every collective, blocking, on a background thread; mpi4py releases the GIL inside MPI
calls, so the transfer moves while the main thread computes. :class:`CommThread` is that
thread: :meth:`CommThread.submit` queues a callable (one blocking collective) and returns a
:class:`ThreadHandle` whose ``wait()`` returns once it ran.

Rules that keep it safe:

- one thread per communicator stream, and only it calls MPI on that stream's communicator,
  so the collectives on it are issued in the submission order, the same on every rank
  (the engine submits buckets in one agreed order);
- MPI must give ``MPI_THREAD_MULTIPLE`` (:func:`check_thread_level`), since the main thread
  keeps calling MPI on its own communicators meanwhile;
- an exception inside the thread fails the handle it belongs to (``wait()`` raises
  :class:`CommThreadError` naming the rank and the operation) and every later one; if the
  main thread does not collect it within ``abort_after`` seconds, the job is aborted with
  the same line (a failure is never silent);
- :meth:`CommThread.close` runs what is queued, then stops the thread: nothing is left
  half-issued on some ranks. The watchdog's dump names each thread's current operation.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from mpitrain.errors import MpitrainError, with_hint
from mpitrain.runtime import ulfm
from mpitrain.timeline.recorder import NULL, Timeline

#: every live communication thread (the watchdog's dump names what each is doing)
_LIVE: weakref.WeakSet[CommThread] = weakref.WeakSet()
_IDS = itertools.count()


class CommThreadError(MpitrainError):
    """A queued operation raised inside the communication thread."""


@dataclass
class _Job:
    fn: Callable[[], None]
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    collected: bool = False
    queued_at: int = 0  #: the timeline's clock at submit (0: not recorded)


class ThreadHandle:
    """A queued operation; ``wait()`` returns once the communication thread ran it."""

    __slots__ = ("_job", "_owner")

    def __init__(self, job: _Job, owner: CommThread) -> None:
        self._job = job
        self._owner = owner

    def wait(self) -> None:
        """Block until the operation ran; raise :class:`CommThreadError` if it failed."""
        self._job.done.wait()
        self._raise()

    def test(self) -> bool:
        """Return whether the operation ran (raising if it failed); never blocks."""
        if not self._job.done.is_set():
            return False
        self._raise()
        return True

    def done(self) -> bool:
        """Return whether the operation ran (failed or not); never blocks, never raises."""
        return self._job.done.is_set()

    def _raise(self) -> None:
        job = self._job
        if job.error is not None:
            job.collected = True
            if self._owner.first_error is not None:  # the failure behind a "not run"
                self._owner.first_error.collected = True
            raise CommThreadError(self._owner.failure_line(job)) from job.error


class CommThread:
    """One daemon thread running submitted callables in order (see the module docstring).

    Args:
        rank: this rank (named in failures).
        name: the stream, e.g. ``"gradients"`` (the thread is ``mpitrain-comm-<name>``).
        abort_after: seconds a failure may stay uncollected before the job is aborted.
    """

    def __init__(self, rank: int, name: str = "gradients", *, abort_after: float = 10.0) -> None:
        self.rank = rank
        self.name = name
        self.abort_after = abort_after
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._error: _Job | None = None
        self.current: tuple[str, float] | None = None  #: (operation, start) now running
        self.submitted = 0
        #: records each operation's wait in the queue and its run (``thread_span``)
        self.timeline: Timeline = NULL
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"mpitrain-comm-{name}-{next(_IDS)}", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def submit(self, fn: Callable[[], None], name: str) -> ThreadHandle:
        """Queue ``fn`` (called on the thread, after everything queued before it)."""
        if self._closed:
            raise CommThreadError(f"rank {self.rank}: communication thread '{self.name}' "
                                  f"is closed; '{name}' was submitted after close()")
        job = _Job(fn, name, queued_at=self.timeline.now() if self.timeline.on else 0)
        self.submitted += 1
        self._queue.put(job)
        return ThreadHandle(job, self)

    def failure_line(self, job: _Job) -> str:
        """The one line that reports ``job``'s failure."""
        return with_hint(
            f"rank {self.rank}: '{job.name}' failed in the communication thread "
            f"'{self.name}': {type(job.error).__name__}: {job.error}",
            "the operation's own error is chained below; later operations were not run")

    @property
    def first_error(self) -> _Job | None:
        """The operation whose failure stopped the thread (None: none failed)."""
        return self._error

    def describe(self) -> str:
        """What the thread is doing now (the watchdog's dump)."""
        cur = self.current
        if cur is None:
            return f"communication thread '{self.name}': idle ({self.submitted} run)"
        return (f"communication thread '{self.name}': in '{cur[0]}' for "
                f"{time.monotonic() - cur[1]:.1f} s")

    def close(self) -> None:
        """Run what is queued, then stop the thread (not collective; idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()
        _LIVE.discard(self)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:  # after a failure nothing else is issued
                job.error = CommThreadError(f"not run: '{self._error.name}' failed before it")
                job.done.set()
                continue
            self.current = (job.name, time.monotonic())
            tl = self.timeline
            t0 = tl.now() if tl.on else 0
            try:
                job.fn()
            except BaseException as exc:  # reported through the handle
                job.error = exc
                self._error = job
                if not ulfm.recoverable(exc):
                    # (a lost peer under --on-rank-loss shrink: the main thread recovers)
                    threading.Thread(target=self._abort_if_uncollected, args=(job,),
                                     daemon=True).start()
            finally:
                self.current = None
                if tl.on and job.queued_at:
                    track = f"comm thread {self.name}"
                    tl.thread_span(track, f"queued: {job.name}", job.queued_at, t0)
                    tl.thread_span(track, job.name, t0, tl.now())
                job.done.set()

    def _abort_if_uncollected(self, job: _Job) -> None:
        """End the job if the main thread has not collected ``job``'s failure in time."""
        deadline = time.monotonic() + self.abort_after
        while time.monotonic() < deadline:
            if job.collected:
                return
            time.sleep(0.05)
        import sys

        from mpi4py import MPI

        from mpitrain.runtime.abort import abort_job

        sys.stderr.write(f"{self.failure_line(job)} (not collected within "
                         f"{self.abort_after:g} s: the job is aborted)\n")
        sys.stderr.flush()
        abort_job(MPI.COMM_WORLD, 1)


def live_threads() -> list[CommThread]:
    """The communication threads of this process (for the watchdog)."""
    return list(_LIVE)


def check_thread_level() -> None:
    """Refuse the thread mode where MPI was not initialised with ``MPI_THREAD_MULTIPLE``."""
    from mpi4py import MPI

    level = MPI.Query_thread()
    if level < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                 MPI.THREAD_SERIALIZED: "serialized"}
        raise MpitrainError(with_hint(
            f"--comm-progress thread needs MPI_THREAD_MULTIPLE; this MPI gave "
            f"'{names.get(level, level)}'",
            "use --comm-progress poll, or an MPI built with thread support (mpi4py asks "
            "for 'multiple' unless mpi4py.rc.thread_level says otherwise)"))
