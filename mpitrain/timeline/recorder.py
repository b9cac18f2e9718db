"""Per-rank span recorder with a bounded ring buffer, and a null recorder that costs nothing.

Code that records asks ``if tl.on:`` (one attribute read) or calls the null object's no-op
methods; a :class:`Recorder` is ``on`` only inside its step window (``steps=(A, B)``: steps
A..B-1, counted from 0 as the trainer counts them) and keeps at most ``capacity`` events (the
oldest are dropped first and counted), so a run of any length records a bounded amount.

Tracks: ``MAIN`` (0) holds the rank's step, data wait, forward, backward, synchronize, optimizer,
checkpoint, evaluation and step agreement spans; bucket ``b`` has its own track ``bucket_track(b)``
holding its in-flight span (launch to observed completion) with the launch call nested in it.
Every other collective (ZeRO's reduce-scatters and all-gathers, the asynchronous modes'
all-reduces and messages, the tensor-parallel collectives, the pipeline's sends and receives) is
a *flight* named for what it moves (``"all-gather b3"``, ``"push s0"``, ``"tp all-reduce fwd"``):
:meth:`Recorder.comm_started` opens it on a track of that name (a second lane when two of one
name are in flight), :meth:`~Recorder.comm_done` / :meth:`~Recorder.comm_waited` close it; a
blocking call is one :meth:`~Recorder.comm_blocking` span. Its span's args hold ``bytes``,
``op`` and what the caller adds (``group``, ``peer``, ``stage``: :mod:`mpitrain.timeline.stages`).
Waits are spans of category ``wait`` on the main track. Traffic an exchange cannot record is
named with :meth:`~Recorder.note`, and the summary prints it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, NamedTuple, Protocol

from mpitrain.timeline.clock import Clock

#: main track of a rank (Chrome trace ``tid``)
MAIN = 0
#: events kept per rank by default (about 150 bytes each once written)
DEFAULT_CAPACITY = 20_000
#: the first track of named flights (bucket tracks stay below it)
FLIGHT_TRACK0 = 1 << 20


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

    def bucket_launched(self, b: int, nbytes: int, t0: int, ranks: int | None = None) -> None:
        """Bucket ``b`` (``nbytes``, reduced over ``ranks``: None = every rank of the trace)
        was launched at ``t0``; the launch call returned now."""

    def bucket_done(self, b: int) -> None:
        """Bucket ``b``'s reduction was observed complete now."""

    def bucket_waited(self, b: int, t0: int) -> None:
        """``wait()`` on bucket ``b`` ran from ``t0`` to now."""

    def comm_started(self, name: str, nbytes: int, t0: int, op: str,
                     args: dict[str, Any] | None = None) -> int:
        """Collective ``name`` (``op``, ``nbytes``; more ``args`` for its span, such as the
        group or peer) was started at ``t0``; the start call returned now. Returns the
        flight's key (-1 when nothing is recorded)."""

    def comm_done(self, key: int) -> None:
        """Flight ``key`` was observed complete now."""

    def comm_waited(self, key: int, t0: int) -> None:
        """``wait()`` on flight ``key`` ran from ``t0`` to now (it is complete)."""

    def comm_blocking(self, name: str, nbytes: int, t0: int, op: str,
                      args: dict[str, Any] | None = None) -> None:
        """A blocking collective ``name`` ran from ``t0`` to now (in flight and waited on)."""

    def note(self, text: str) -> None:
        """Say which traffic this rank cannot record (printed by the summary)."""

    def thread_span(self, track: str, name: str, t0: int, t1: int,
                    args: dict[str, Any] | None = None) -> None:
        """A span another thread ran (``t0``..``t1`` from :meth:`now`), on its own ``track``;
        callable from that thread."""


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

    def bucket_launched(self, b: int, nbytes: int, t0: int, ranks: int | None = None) -> None:
        """Do nothing."""

    def thread_span(self, track: str, name: str, t0: int, t1: int,
                    args: dict[str, Any] | None = None) -> None:
        """Do nothing."""

    def bucket_done(self, b: int) -> None:
        """Do nothing."""

    def bucket_waited(self, b: int, t0: int) -> None:
        """Do nothing."""

    def comm_started(self, name: str, nbytes: int, t0: int, op: str,
                     args: dict[str, Any] | None = None) -> int:
        """Return -1."""
        return -1

    def comm_done(self, key: int) -> None:
        """Do nothing."""

    def comm_waited(self, key: int, t0: int) -> None:
        """Do nothing."""

    def comm_blocking(self, name: str, nbytes: int, t0: int, op: str,
                      args: dict[str, Any] | None = None) -> None:
        """Do nothing."""

    def note(self, text: str) -> None:
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
        self._inflight: dict[int, tuple[int, int, int | None]] = {}  # bucket -> (t0, bytes, ranks)
        #: named flights in flight: key -> (name, track, t0, args, step); args holds
        #: ``bytes``, ``op`` and what the caller added (``group``, ``peer`` ...)
        self._flights: dict[int, tuple[str, int, int, dict[str, Any], int]] = {}
        self._keys = 0
        self._lanes: dict[str, list[int]] = {}  # flight name -> its tracks
        self._busy: set[int] = set()
        #: track -> name, for the tracks of named flights (the trace's thread names)
        self.track_names: dict[int, str] = {}
        self._thread_tracks: dict[str, int] = {}  # other threads' tracks by name
        #: traffic this rank does not record (in the order first noted)
        self.notes: list[str] = []
        # flights may complete on a progress thread (double-buffer's poller)
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        """Events recorded but no longer kept (the ring buffer overflowed)."""
        return self.recorded - len(self.events)

    def _add(self, name: str, cat: str, tid: int, t0: int, t1: int,
             args: dict[str, Any] | None, step: int | None = None) -> None:
        with self._lock:
            self.events.append(Event(name, cat, tid, t0, t1,
                                     self.step if step is None else step, args))
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

    def bucket_launched(self, b: int, nbytes: int, t0: int, ranks: int | None = None) -> None:
        """Bucket ``b`` was launched at ``t0``; records the launch call, opens its flight."""
        if self.on:
            t1 = self.clock()
            self._add("launch", "launch", bucket_track(b), t0, t1, None)
            self._inflight[b] = (t0, nbytes, ranks)

    def bucket_done(self, b: int) -> None:
        """Close bucket ``b``'s in-flight span (no-op when it is not in flight)."""
        started = self._inflight.pop(b, None)
        if started is not None:
            t0, nbytes, ranks = started
            args = {"bucket": b, "bytes": nbytes}
            if ranks is not None:  # a group smaller than the trace (a grid's replicas)
                args["ranks"] = ranks
            self._add(f"allreduce b{b}", "bucket", bucket_track(b), t0, self.clock(), args)

    def bucket_waited(self, b: int, t0: int) -> None:
        """Record the wait on bucket ``b`` from ``t0`` and close its flight (if in flight)."""
        if b in self._inflight:
            self._add(f"wait b{b}", "wait", MAIN, t0, self.clock(), {"bucket": b})
            self.bucket_done(b)

    def thread_span(self, track: str, name: str, t0: int, t1: int,
                    args: dict[str, Any] | None = None) -> None:
        """Record a span of another thread (a communication thread's queue wait or
        transfer) on the track named ``track`` (thread-safe)."""
        if not self.on:
            return
        with self._lock:
            tid = self._thread_tracks.get(track)
            if tid is None:
                tid = FLIGHT_TRACK0 + len(self.track_names)
                self._thread_tracks[track] = tid
                self.track_names[tid] = track
        self._add(name, "thread", tid, t0, t1, args)

    def _lane(self, name: str) -> int:
        """A track for a flight of ``name``: the first of its lanes that is free."""
        lanes = self._lanes.setdefault(name, [])
        for tid in lanes:
            if tid not in self._busy:
                break
        else:
            tid = FLIGHT_TRACK0 + len(self.track_names)
            lanes.append(tid)
            self.track_names[tid] = name if len(lanes) == 1 else f"{name} ({len(lanes)})"
        self._busy.add(tid)
        return tid

    def _open(self, name: str, nbytes: int, t0: int, op: str,
              args: dict[str, Any] | None) -> tuple[int, int]:
        """Open flight ``name`` on a free lane; returns (key, track)."""
        with self._lock:
            tid = self._lane(name)
            self._keys += 1
            key = self._keys
            self._flights[key] = (name, tid, t0, {"bytes": nbytes, "op": op, **(args or {})},
                                  self.step)
        return key, tid

    def comm_started(self, name: str, nbytes: int, t0: int, op: str,
                     args: dict[str, Any] | None = None) -> int:
        """Open flight ``name`` (``op``, ``nbytes``, and ``args`` for its span) begun at
        ``t0``, recording the start call (``t0`` to now) on its track; returns its key (-1
        when off: nothing is recorded)."""
        if not self.on:
            return -1
        t1 = self.clock()
        key, tid = self._open(name, nbytes, t0, op, args)
        self._add("launch", "launch", tid, t0, t1, None)
        return key

    def comm_done(self, key: int) -> None:
        """Close flight ``key`` now (no-op when it is not in flight). Its span carries the step
        it started in: a flight that spans steps (double-buffer) belongs to the step that
        started it."""
        t1 = self.clock()
        with self._lock:
            started = self._flights.pop(key, None)
            if started is not None:
                self._busy.discard(started[1])
        if started is not None:
            name, tid, t0, args, step = started
            self._add(name, "comm", tid, t0, t1, args, step)

    def comm_waited(self, key: int, t0: int) -> None:
        """Record the wait on flight ``key`` from ``t0`` (while on) and close the flight."""
        started = self._flights.get(key)
        if started is None:
            return
        if self.on:
            self._add(f"wait {started[0]}", "wait", MAIN, t0, self.clock(), None)
        self.comm_done(key)

    def comm_blocking(self, name: str, nbytes: int, t0: int, op: str,
                      args: dict[str, Any] | None = None) -> None:
        """Record a blocking collective that ran from ``t0`` to now: its flight (``args``
        added to its span), and the rank's wait for it on the main track (when on)."""
        if not self.on:
            return
        key, _ = self._open(name, nbytes, t0, op, args)
        self.comm_waited(key, t0)

    def note(self, text: str) -> None:
        """Remember that ``text`` names traffic this rank does not record (once)."""
        if text not in self.notes:
            self.notes.append(text)

    def in_flight(self) -> list[int]:
        """Buckets launched and not yet observed complete."""
        return sorted(self._inflight)

    def flights(self) -> list[str]:
        """Names of the named flights not yet observed complete."""
        return sorted(f[0] for f in self._flights.values())
