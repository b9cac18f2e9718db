"""Multi-stage collectives in flight: a FIFO queue that starts each stage in order.

A hierarchical collective is a chain of MPI calls on different communicators (inside the
node, then across nodes, ...). :class:`StageQueue` progresses many such chains at once:
operation *i* may start stage *s* only after operation *i-1* has started stage *s*, so every
stage's communicator sees the operations in the same order on every rank, however the
caller interleaves ``wait()`` and ``test()``. Used by the hierarchical all-reduce and the
hierarchical reduce-scatter / all-gather of the ZeRO shards.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi4py import MPI

#: a stage starter: called with True it starts the non-blocking call and returns its request,
#: with False it runs the blocking call (returns None); None also means "nothing to do"
Stage = Callable[[bool], "MPI.Request | None"]


def call(comm: MPI.Intracomm, name: str, nb: bool, *args: Any, **kw: Any) -> MPI.Request | None:
    """``comm.Name(...)`` blocking, or ``comm.Iname(...)`` returning its request."""
    if nb:
        return getattr(comm, "I" + name[0].lower() + name[1:])(*args, **kw)  # type: ignore[no-any-return]
    getattr(comm, name)(*args, **kw)
    return None


class _Op:
    """One operation in flight: its stage starters, current request and finishing step."""

    __slots__ = ("done", "finish", "req", "stages", "started")

    def __init__(self, stages: Sequence[Stage], finish: Callable[[], None]) -> None:
        self.stages = list(stages)
        self.finish = finish
        self.started = 0  # stages started so far
        self.req: MPI.Request | None = None
        self.done = False


class _OpHandle:
    """Handle of one queued operation; waiting progresses earlier ones first."""

    __slots__ = ("_op", "_owner")

    def __init__(self, owner: StageQueue, op: _Op) -> None:
        self._owner = owner
        self._op = op

    def wait(self) -> None:
        """Progress the queue until this operation has finished."""
        self._owner.drive(self._op, block=True)

    def test(self) -> bool:
        """Progress without blocking; True when finished."""
        if not self._op.done:
            self._owner.drive(self._op, block=False)
        return self._op.done


class StageQueue:
    """Chains of stages progressed in FIFO order (thread-safe: hooks may run on autograd's
    device thread)."""

    def __init__(self) -> None:
        self._queue: deque[_Op] = deque()
        self._lock = threading.RLock()

    def submit(self, stages: Sequence[Stage], finish: Callable[[], None]) -> _OpHandle:
        """Collective (same order on every rank): queue an operation, start what may start."""
        with self._lock:
            op = _Op(stages, finish)
            self._queue.append(op)
            self.drive(op, block=False)
        return _OpHandle(self, op)

    def run_blocking(self, stages: Sequence[Stage], finish: Callable[[], None]) -> None:
        """Collective: finish what is queued, then run ``stages`` with blocking MPI calls."""
        with self._lock:
            self.drain()
            for stage in stages:
                stage(False)
            finish()

    def drain(self) -> None:
        """Wait for every queued operation."""
        with self._lock:
            while self._queue:
                self.drive(self._queue[0], block=True)

    def drive(self, target: _Op, *, block: bool) -> None:
        """Advance queued operations in FIFO order; with ``block``, until ``target`` is done."""
        with self._lock:
            while True:
                self._advance()
                if target.done or not block:
                    return
                head = next(op for op in self._queue if op.req is not None)
                if head.req is not None:
                    head.req.Wait()
                    head.req = None

    def _advance(self) -> None:
        """Start every stage that may start and finish every operation that completed."""
        allowed = 1 << 30  # stages the previous operation has started
        for op in self._queue:
            while not op.done:
                if op.req is not None:
                    if not op.req.Test():
                        break
                    op.req = None
                if op.started == len(op.stages):
                    op.finish()
                    op.done = True
                    break
                if op.started >= allowed:
                    break
                op.req = op.stages[op.started](True)
                op.started += 1
            if not op.done:  # a finished op (maybe of fewer stages) holds nothing back
                allowed = min(allowed, op.started)
        while self._queue and self._queue[0].done:
            self._queue.popleft()
