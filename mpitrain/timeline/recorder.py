"""Per-rank span recorder with a bounded ring buffer, and a null recorder that costs nothing.

Code that records asks ``if tl.on:`` (one attribute read) or calls the null object's no-op
methods; a :class:`Recorder` is ``on`` only inside its step window (``steps=(A, B)``: steps
A..B-1, counted from 0 as the trainer counts them) and keeps at most ``capacity`` events (the
oldest are dropped first and counted), so a run of any length records a bounded amount.

Tracks: ``MAIN`` (0) holds the rank's step, data wait, forward, backward, synchronize, optimizer,
checkpoint, evaluation and step agreement spans; bucket ``b`` has its own track ``bucket_track(b)``
holding its in-flight span (launch to observed completion) with the launch call nested in it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple, Protocol

from mpitrain.timeline.clock import Clock

#: main track of a rank (Chrome trace ``tid``)
MAIN = 0
#: events kept per rank by default (about 150 bytes each once written)
DEFAULT_CAPACITY = 20_000


def bucket_track(b: int) -> int:
    """The track (``tid``) of bucket ``b``."""
    return 1 + b


class Event(NamedTuple):
    """One recorded span (``t1 > t0`` or equal) or instant mark (``cat == 'mark'``)."""

    name: str
    cat: str
    tid: int
    t0: int  # local clock, ns
    t1: int
    step: int
    args: dict[str, Any] | None


class Timeline(Protocol):
    """What instrumented code calls; satisfied by :class:`Recorder` and :class:`NullRecorder`."""

    on: bool

    def now(self) -> int:
        """Return the current time (ns) on this recorder's clock."""

    def span(self, name: str, t0: int, cat: str = "compute", args: dict[str, Any] | None = None
             ) -> None:
        """Record a span from ``t0`` to now on the main track."""

    def mark(self, name: str, args: dict[str, Any] | None = None) -> None:
        """Record an instant event on the main track."""

    def step_begin(self, step: int, t0: int | None = None) -> None:
        """Start step ``step`` at ``t0`` (default now); turns recording on inside the window."""

    def step_end(self) -> None:
        """End the current step's span."""

    def bucket_launched(self, b: int, nbytes: int, t0: int) -> None:
        """Bucket ``b`` (``nbytes``) was launched at ``t0``; the launch call returned now."""

    def bucket_done(self, b: int) -> None:
        """Bucket ``b``'s reduction was observed complete now."""

    def bucket_waited(self, b: int, t0: int) -> None:
        """``wait()`` on bucket ``b`` ran from ``t0`` to now."""


class NullRecorder:
    """Records nothing; every method returns at once."""

    on = False

    def now(self) -> int:
        """Return 0."""
        return 0

    def span(self, name: str, t0: int, cat: str = "compute", args: dict[str, Any] | None = None
             ) -> None:
        """Do nothing."""

    def mark(self, name: str, args: dict[str, Any] | None = None) -> None:
        """Do nothing."""

    def step_begin(self, step: int, t0: int | None = None) -> None:
        """Do nothing."""

    def step_end(self) -> None:
        """Do nothing."""

    def bucket_launched(self, b: int, nbytes: int, t0: int) -> None:
        """Do nothing."""

    def bucket_done(self, b: int) -> None:
        """Do nothing."""

    def bucket_waited(self, b: int, t0: int) -> None:
        """Do nothing."""


NULL = NullRecorder()


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """Parse ``"A:B"`` (steps A..B-1; ``"A:"`` from A on; ``":"`` or None: every step).

    Raises:
        ValueError: not ``A:B`` with 0 <= A < B (either side may be empty).
    """
    if text is None or text.strip() in ("", ":"):
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else 1 << 62
    except ValueError:
        raise ValueError(f"timeline steps {text!r} is not A:B (for example 10:20)") from None
    if a < 0 or b <= a:
        raise ValueError(f"timeline steps {text!r}: need 0 <= A < B")
    return (a, b)


class Recorder:
    """Record spans of one rank inside a step window into a ring buffer of ``capacity`` events.

    Args:
        steps: record steps A..B-1 only (``None``: always on, also outside steps).
        capacity: events kept; older ones are dropped (counted in :attr:`dropped`).
        clock: monotonic nanosecond clock (tests inject skewed or fake clocks).
    """

    def __init__(
        self,
        *,
        steps: tuple[int, int] | None = None,
        capacity: int = DEFAULT_CAPACITY,
        clock: Clock = time.perf_counter_ns,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"timeline capacity must be >= 1, got {capacity}")
        self.steps = steps
        self.capacity = capacity
        self.clock = clock
        self.on = steps is None
        self.events: deque[Event] = deque(maxlen=capacity)
        self.recorded = 0
        self.step = -1
        self._step_t0: int | None = None
        self._inflight: dict[int, tuple[int, int]] = {}  # bucket -> (t0, nbytes)

    @property
    def dropped(self) -> int:
        """Events recorded but no longer kept (the ring buffer overflowed)."""
        return self.recorded - len(self.events)

    def _add(self, name: str, cat: str, tid: int, t0: int, t1: int,
             args: dict[str, Any] | None) -> None:
        self.events.append(Event(name, cat, tid, t0, t1, self.step, args))
        self.recorded += 1

    def now(self) -> int:
        """Return the current time (ns) on this recorder's clock."""
        return self.clock()

    def span(self, name: str, t0: int, cat: str = "compute", args: dict[str, Any] | None = None
             ) -> None:
        """Record a span from ``t0`` (from :meth:`now`) to now on the main track, when on."""
        if self.on:
            self._add(name, cat, MAIN, t0, self.clock(), args)

    def mark(self, name: str, args: dict[str, Any] | None = None) -> None:
        """Record an instant event on the main track, when on."""
        if self.on:
            t = self.clock()
            self._add(name, "mark", MAIN, t, t, args)

    def step_begin(self, step: int, t0: int | None = None) -> None:
        """Start step ``step`` at ``t0`` (from :meth:`now`; default now): close an unfinished
        step, switch recording on or off for the window."""
        self.step_end()
        self.step = step
        if self.steps is not None:
            self.on = self.steps[0] <= step < self.steps[1]
        if self.on:
            self._step_t0 = self.clock() if t0 is None else t0

    def step_end(self) -> None:
        """Record the current step's span (from :meth:`step_begin` to now)."""
        if self._step_t0 is not None:
            self._add("step", "step", MAIN, self._step_t0, self.clock(), {"step": self.step})
            self._step_t0 = None

    def bucket_launched(self, b: int, nbytes: int, t0: int) -> None:
        """Bucket ``b`` was launched at ``t0``; records the launch call, opens its flight."""
        if self.on:
            t1 = self.clock()
            self._add("launch", "launch", bucket_track(b), t0, t1, None)
            self._inflight[b] = (t0, nbytes)

    def bucket_done(self, b: int) -> None:
        """Close bucket ``b``'s in-flight span (no-op when it is not in flight)."""
        started = self._inflight.pop(b, None)
        if started is not None:
            t0, nbytes = started
            self._add(f"allreduce b{b}", "bucket", bucket_track(b), t0, self.clock(),
                      {"bucket": b, "bytes": nbytes})

    def bucket_waited(self, b: int, t0: int) -> None:
        """Record the wait on bucket ``b`` from ``t0`` and close its flight (if in flight)."""
        if b in self._inflight:
            self._add(f"wait b{b}", "wait", MAIN, t0, self.clock(), {"bucket": b})
            self.bucket_done(b)

    def in_flight(self) -> list[int]:
        """Buckets launched and not yet observed complete."""
        return sorted(self._inflight)
