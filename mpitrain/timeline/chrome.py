"""Merge every rank's recorder into one Chrome trace event file (Perfetto, chrome://tracing).

One process per rank (``pid`` = rank), one thread per track: ``tid 0`` the rank's steps and
phases, ``tid 1 + b`` bucket ``b``, then one per named flight (``"all-gather b3"``). Times are
microseconds on rank 0's clock since rank 0 started recording (clock offsets from
:mod:`mpitrain.timeline.clock`). The file is written by rank 0 through
:func:`mpitrain.runtime.files.write_atomic` (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.errors import ConfigError, MpitrainError, with_hint
from mpitrain.runtime.collective import agree
from mpitrain.runtime.files import write_atomic, write_failure
from mpitrain.runtime.tool_io import check_output_file
from mpitrain.timeline.clock import Clock, ClockFit, ClockSample, estimate_offset
from mpitrain.timeline.recorder import (
    DEFAULT_CAPACITY,
    MAIN,
    NULL,
    Recorder,
    Timeline,
    parse_steps,
)

if TYPE_CHECKING:
    from mpi4py import MPI

#: written into ``otherData.format``; the summary refuses other formats
FORMAT = "mpitrain-timeline/1"


def chrome_events(rec: Recorder, fit: ClockFit, rank: int, origin_ns: float
                  ) -> list[dict[str, Any]]:
    """Return ``rec``'s events as Chrome trace dicts on rank 0's clock (µs since origin)."""
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
         "args": {"name": f"rank {rank}"}},
        {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0,
         "args": {"sort_index": rank}},
    ]
    tids: set[int] = {MAIN}
    for e in rec.events:
        t0 = fit.align(e.t0)
        args = {"step": e.step, **(e.args or {})}
        ev: dict[str, Any] = {"name": e.name, "cat": e.cat, "pid": rank, "tid": e.tid,
                              "ts": round((t0 - origin_ns) / 1000.0, 3), "args": args}
        if e.cat == "mark":
            ev["ph"], ev["s"] = "i", "t"
        else:
            ev["ph"] = "X"
            ev["dur"] = round(max(fit.align(e.t1) - t0, 0.0) / 1000.0, 3)
        out.append(ev)
        tids.add(e.tid)
    for tid in sorted(tids):
        name = "steps" if tid == MAIN else rec.track_names.get(tid, f"bucket {tid - 1}")
        out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid,
                    "args": {"name": name}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid,
                    "args": {"sort_index": tid}})
    return out


def order_key(ev: dict[str, Any]) -> tuple[int, int, float, float]:
    """Sort key: metadata first, then by rank, track, start, longer (enclosing) spans first."""
    if ev["ph"] == "M":
        return (0, ev["pid"], -1.0, 0.0)
    return (1, ev["pid"], ev["ts"], -float(ev.get("dur", 0.0)))


class TraceSession:
    """A recorder plus what writing it needs: the communicator, the path, the start clock.

    Made by :func:`start` (collective); :meth:`stop` (collective) writes the file once.
    """

    def __init__(self, comm: MPI.Intracomm | None, path: Path | None, recorder: Timeline,
                 start_sample: ClockSample | None) -> None:
        self.comm = comm
        self.path = path
        self.recorder = recorder
        self._start = start_sample
        self._stopped = comm is None

    @property
    def active(self) -> bool:
        """Whether this session records (and :meth:`stop` will write a file)."""
        return not self._stopped

    def stop(self) -> Path | None:
        """Collective: measure the clocks again, merge every rank on rank 0 and write the file.

        Returns the path written (on every rank), or None for an inactive/stopped session.

        Raises:
            MpitrainError: the file could not be written (the same message on every rank).
        """
        if self._stopped:
            return None
        self._stopped = True
        comm, rec, path = self.comm, self.recorder, self.path
        assert comm is not None and path is not None and self._start is not None
        assert isinstance(rec, Recorder)
        rec.step_end()
        rec.on = False
        end = estimate_offset(comm, rec.clock)
        fit = ClockFit(self._start, end)
        rank = comm.Get_rank()
        origin = comm.bcast(fit.align(self._start.local_ns) if rank == 0 else None, root=0)
        mine = chrome_events(rec, fit, rank, origin)
        clock = {"rank": rank, "offset_ns": round(fit.offset_at(self._start.local_ns)),
                 "drift_ppm": fit.drift_ppm,
                 "bound_ns": fit.bound_ns, "rtt_ns": [self._start.rtt_ns, end.rtt_ns],
                 "start_local_ns": self._start.local_ns,
                 "fit_span_ns": end.local_ns - self._start.local_ns,
                 "dropped": rec.dropped, "recorded": rec.recorded, "notes": list(rec.notes)}
        gathered = comm.gather((mine, clock), root=0)
        error: str | None = None
        if rank == 0:
            assert gathered is not None
            try:
                write_merged(path, gathered, rec.steps)
            except OSError as exc:
                error = "timeline: " + write_failure(path, exc, None)
        error = comm.bcast(error, root=0)
        if error is not None:
            raise MpitrainError(error)
        return path


def write_merged(path: Path, gathered: list[tuple[list[dict[str, Any]], dict[str, Any]]],
                 steps: tuple[int, int] | None) -> None:
    """Write the ranks' (events, clock info) pairs, rank order, as one trace file (atomic).

    Raises:
        OSError: as the write raised it; no temporary file is left.
    """
    events = [ev for evs, _ in gathered for ev in evs]
    events.sort(key=order_key)
    doc = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "format": FORMAT,
            "ranks": len(gathered),
            "steps": list(steps) if steps is not None else None,
            "clocks": [c for _, c in gathered],
            # traffic some rank could not record (the summary prints each once)
            "notes": list(dict.fromkeys(n for _, c in gathered for n in c.get("notes", []))),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def start(
    comm: MPI.Intracomm,
    path: str | Path | None,
    *,
    steps: tuple[int, int] | None = None,
    capacity: int = DEFAULT_CAPACITY,
    clock: Clock = time.perf_counter_ns,
) -> TraceSession:
    """Collective: start recording a timeline to ``path`` (None: an inactive session).

    Measures every rank's clock offset from rank 0's (a few ping-pongs per rank). Hand
    ``session.recorder`` to the code that records (``engine.timeline = session.recorder``),
    then call ``session.stop()`` on every rank to write the merged file.
    """
    if path is None:
        return TraceSession(None, None, NULL, None)
    rec = Recorder(steps=steps, capacity=capacity, clock=clock)
    sample = estimate_offset(comm, clock)
    return TraceSession(comm, Path(path), rec, sample)


def check_timeline_path(comm: MPI.Intracomm, path: str | None) -> None:
    """Collective (when ``path`` is set): refuse an unusable ``--timeline`` before the run.

    Rank 0 writes the file when the run ends, so rank 0 proves now that it can (not a
    directory, not under a regular file, its directory writable; missing parents are
    created); every rank raises the same ConfigError.
    """
    if path is None:
        return
    agree(comm, lambda: check_output_file(Path(path), "--timeline", example="trace.json")
          if comm.Get_rank() == 0 else None)


def start_timeline(comm: MPI.Intracomm, path: str | None, steps: str | None) -> TraceSession:
    """Collective (when ``path`` is set): :func:`start` for the trainer's options.

    Args:
        path: ``--timeline`` (None: an inactive session, no communication).
        steps: ``--timeline-steps`` ``"A:B"``.

    Raises:
        ConfigError: ``steps`` is not ``A:B`` (raised on every rank: the options are the same).
    """
    if path is None:
        return start(comm, None)
    try:
        window = parse_steps(steps)
    except ValueError as exc:
        raise ConfigError(with_hint(str(exc), "--timeline-steps 10:20 records steps 10..19; "
                                    "':' records every step")) from exc
    return start(comm, path, steps=window)
