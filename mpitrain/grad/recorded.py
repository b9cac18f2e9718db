"""Collectives recorded into a timeline: what every exchange uses besides the engine's buckets.

``recorded(tl, "all-gather b3", nbytes, "all-gather", lambda: comm.iallgather_(buf))`` starts
the collective and, while ``tl`` records, returns a handle whose flight (start to observed
completion) and waits land in the timeline like a bucket's: ``test()`` that finds it complete
closes the flight, ``wait()`` records the rank's wait and closes it. Off (the null recorder,
or outside the step window) it returns the collective's own handle: no cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.broadcast import broadcast_

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.comm.handle import Handle
    from mpitrain.timeline.recorder import Timeline


class RecordedHandle:
    """``inner`` with its completion and waits recorded as flight ``key`` of ``tl``."""

    __slots__ = ("_closed", "_inner", "_key", "_tl")

    def __init__(self, inner: Handle, tl: Timeline, key: int) -> None:
        self._inner = inner
        self._tl = tl
        self._key = key
        self._closed = False

    def wait(self) -> None:
        """Wait for the collective; the wait and the flight's end are recorded (once)."""
        if self._closed:
            self._inner.wait()
            return
        t0 = self._tl.now()
        self._inner.wait()
        self._closed = True
        self._tl.comm_waited(self._key, t0)

    def test(self) -> bool:
        """Return True when complete (the first time: the flight ends now)."""
        if not self._inner.test():
            return False
        if not self._closed:
            self._closed = True
            self._tl.comm_done(self._key)
        return True


def recorded(tl: Timeline, name: str, nbytes: int, op: str, start: Callable[[], Handle]
             ) -> Handle:
    """Collective: ``start()`` the collective named ``name`` (``op`` on ``nbytes``); while
    ``tl`` records, its flight and waits are recorded (see the module docstring)."""
    if not tl.on:
        return start()
    t0 = tl.now()
    inner = start()
    return RecordedHandle(inner, tl, tl.comm_started(name, nbytes, t0, op))


def broadcast_buffers(module: torch.nn.Module, comm: MPI.Intracomm, tl: Timeline) -> None:
    """Collective: broadcast ``module``'s buffers (BatchNorm statistics) from rank 0, recorded
    as one blocking ``broadcast buffers`` flight while ``tl`` records."""
    bufs = list(module.buffers())
    t0 = tl.now() if tl.on else 0
    for buf in bufs:
        broadcast_(buf, comm, 0)
    if tl.on and bufs:
        nbytes = sum(b.numel() * b.element_size() for b in bufs)
        tl.comm_blocking("broadcast buffers", nbytes, t0, "broadcast")
