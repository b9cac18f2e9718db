"""Read a timeline trace and report where the time went: overlap, stragglers, buckets.

Definitions (per rank and step; summed over ranks for a step, over steps for the run):

- *communication*: the union of the rank's in-flight spans (launch to observed completion) of
  every recorded collective inside the step: buckets, and the named flights of ZeRO and the
  asynchronous modes (a flight that runs on into the next step counts in each step for the
  part inside it);
- *hidden*: the part of it that overlaps compute spans (forward, backward, optimizer step)
  while the rank is neither starting nor waiting for a collective (launch calls and waits
  inside compute, such as ZeRO's parameter gathers, a blocking reducer's all-reduce started
  from a gradient hook or local SGD's average, are not compute);
  *exposed* = communication - hidden; the *hidden fraction* = hidden / communication;
- *data-wait share*: time in "data wait" spans / step time;
- *last rank*: the rank that entered ``synchronize`` last (rank 0's clock); the others waited
  for it, ``late by`` = its arrival - the earliest arrival;
- per bucket: bytes, flights, median flight time, algorithm bandwidth bytes / time and bus
  bandwidth x 2(n-1)/n (what a ring all-reduce moves per rank), optionally against a peak.
  A flight ends when the engine observes completion (a later gradient hook or the wait in
  synchronize) and includes waiting for late ranks, so the bandwidth is a lower bound; the
  best (shortest) flight is the closest to the transport's own speed;
- per named collective (``reduce-scatter b0``, ``all-gather b3``, ``push s0``,
  ``tp all-reduce fwd``, ``send activation to stage 1`` ...) the same, with the bus bandwidth
  factor of its operation ((n-1)/n for reduce-scatter and all-gather, 1 for broadcasts and
  messages) over its group (``args.ranks``, else every rank of the trace);
- per pipeline stage (model parallelism): the bubble, the tensor-parallel communication and
  the sends and receives (:mod:`mpitrain.timeline.stages`).

Traffic that some rank could not record is listed in words (``otherData.notes``); a window
that recorded no step says so instead of printing zeros.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.tool_io import Fields, decode_text, parse_json, read_bytes
from mpitrain.timeline.chrome import FORMAT
from mpitrain.timeline.intervals import Interval, clip, intersect, length, subtract, union
from mpitrain.timeline.stages import BUBBLE, StageRow, stage_lines, stage_rows

COMPUTE = "compute"
#: span categories that are communication in flight
COMM_CATS = ("bucket", "comm")
#: bytes a rank sends per payload byte (ring algorithms) by operation; others: 1
BUS_FACTOR: dict[str, Callable[[int], float]] = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
}


@dataclass
class StepRow:
    """One step summed over ranks (times in ms; ``time`` is the slowest rank's step)."""

    step: int
    time: float
    comm: float
    exposed: float
    hidden_frac: float | None
    data_share: float
    last_rank: int | None
    late_by: float | None


@dataclass
class BucketRow:
    """One bucket over all steps and ranks."""

    bucket: int
    bytes: int
    flights: int
    median_ms: float
    best_ms: float
    algbw_gbs: float
    busbw_gbs: float
    of_peak: float | None


@dataclass
class CollectiveRow:
    """One named collective (``op`` on ``bytes``) over all steps and ranks."""

    name: str
    op: str
    bytes: int
    flights: int
    median_ms: float
    best_ms: float
    algbw_gbs: float
    busbw_gbs: float
    of_peak: float | None


@dataclass
class Summary:
    """What ``trace summary`` reports."""

    path: str
    ranks: int
    steps: list[StepRow]
    buckets: list[BucketRow]
    comm_ms: float
    exposed_ms: float
    hidden_frac: float | None
    data_share: float
    step_ms: float
    last_counts: dict[int, int] = field(default_factory=dict)
    clock_bound_ms: float = 0.0
    collectives: list[CollectiveRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: traffic that was not recorded
    window: list[int] | None = None  #: the recording window (steps A..B-1), None: all
    #: per pipeline stage: the bubble, tensor-parallel and send/recv time (timeline/stages.py)
    stages: list[StageRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


_HINT = "pass a file written by: python -m mpitrain --timeline PATH ..."


def load(path: Path) -> dict[str, Any]:
    """Read and check a trace file written by mpitrain (plain or gzip-compressed JSON).

    Raises:
        DataError: unreadable, not JSON, not an mpitrain timeline, or a field of the wrong
            kind (one line naming the file and the field).
    """
    data = read_bytes(path, "trace", hint=_HINT, gunzip=True)
    text = decode_text(data, path, "trace", hint=_HINT)
    doc = parse_json(text, path, "trace", hint="was the run killed before it wrote the timeline?")
    other = doc.get("otherData") if isinstance(doc, dict) else None
    fmt = other.get("format") if isinstance(other, dict) else None
    if fmt != FORMAT:
        raise DataError(with_hint(f"trace '{path}' is not an mpitrain timeline (format {fmt!r})",
                                  "write one with: python -m mpitrain --timeline PATH ..."))
    check_trace(doc, path)
    checked: dict[str, Any] = doc
    return checked


def check_trace(doc: dict[str, Any], path: Path) -> None:
    """Check the fields the summary and the plot read: ranks, clocks, the step window, notes
    and every span's rank, track, times, names and arguments (metadata and instant events
    are not read).

    Raises:
        DataError: naming the file and the first bad field (``traceEvents[7].pid``).
    """
    f = Fields(path, "trace", hint=_HINT)
    other = doc["otherData"]
    ranks = f.as_int(f.need(other, "ranks", "otherData"), "otherData.ranks", 1, 1 << 20)
    for i, clock in enumerate(f.as_list(other.get("clocks", []), "otherData.clocks")):
        f.as_obj(clock, f"otherData.clocks[{i}]")
        if "bound_ns" in clock:
            f.as_num(clock["bound_ns"], f"otherData.clocks[{i}].bound_ns", 0)
    if other.get("steps") is not None:
        for w in f.as_list(other["steps"], "otherData.steps", 2):
            f.as_int(w, "otherData.steps")
    f.as_list(other.get("notes", []), "otherData.notes")
    for i, ev in enumerate(f.as_list(f.need(doc, "traceEvents"), "traceEvents")):
        key = f"traceEvents[{i}]"
        if f.as_obj(ev, key).get("ph") != "X":
            continue
        f.as_int(f.need(ev, "pid", key), f"{key}.pid", 0, ranks - 1)
        f.as_int(f.need(ev, "tid", key), f"{key}.tid")
        for name in ("ts", "dur"):
            f.as_num(f.need(ev, name, key), f"{key}.{name}")
        cat = f.as_str(f.need(ev, "cat", key), f"{key}.cat")
        f.as_str(f.need(ev, "name", key), f"{key}.name")
        args = f.as_obj(f.need(ev, "args", key), f"{key}.args")
        if "step" in args or cat == "step":
            f.as_int(f.need(args, "step", f"{key}.args"), f"{key}.args.step", -1)
        if cat == "bucket":
            for name in ("bucket", "bytes"):
                f.as_int(f.need(args, name, f"{key}.args"), f"{key}.args.{name}")
        if cat == "comm":  # a named flight (ZeRO, the asynchronous modes, model parallelism)
            f.as_int(f.need(args, "bytes", f"{key}.args"), f"{key}.args.bytes")
            f.as_str(f.need(args, "op", f"{key}.args"), f"{key}.args.op")
            for name, lo in (("ranks", 1), ("stage", 0), ("peer", 0)):
                if name in args:
                    f.as_int(args[name], f"{key}.args.{name}", lo)
        if cat == BUBBLE and "stage" in args:
            f.as_int(args["stage"], f"{key}.args.stage", 0)


def summarize(doc: dict[str, Any], *, path: str = "", peak_gbs: float | None = None) -> Summary:
    """Compute the report from a loaded trace (see the module docstring for definitions)."""
    ranks = int(doc["otherData"]["ranks"])
    # (rank, step) -> category -> spans (ms); and rank -> category -> spans (every step)
    spans: dict[tuple[int, int], dict[str, list[Interval]]] = defaultdict(lambda: defaultdict(list))
    of_rank: dict[int, dict[str, list[Interval]]] = defaultdict(lambda: defaultdict(list))
    arrivals: dict[int, dict[int, float]] = defaultdict(dict)
    step_span: dict[tuple[int, int], Interval] = {}
    #: (bucket, bytes, group size) -> flight times: a grid's stages have their own buckets
    flights: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    named: dict[str, list[tuple[int, str, float, int]]] = {}
    for ev in doc["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        rank, step = int(ev["pid"]), int(ev["args"].get("step", -1))
        a = ev["ts"] / 1000.0
        b = a + ev["dur"] / 1000.0
        cat = ev["cat"]
        spans[(rank, step)][cat].append((a, b))
        of_rank[rank][cat].append((a, b))
        if cat == "step":
            step_span[(rank, step)] = (a, b)
        elif cat == "sync":
            arrivals[step].setdefault(rank, a)
        elif cat == "bucket":
            args = ev["args"]
            key = (int(args["bucket"]), int(args["bytes"]), int(args.get("ranks", ranks)))
            flights[key].append(b - a)
        elif cat == "comm":
            named.setdefault(ev["name"], []).append(
                (int(ev["args"]["bytes"]), str(ev["args"].get("op", "")), b - a,
                 int(ev["args"].get("ranks", ranks))))
    # per rank: communication in flight, and the part of it under compute the rank did not
    # spend starting or waiting for a collective
    comm_of: dict[int, list[Interval]] = {}
    hidden_of: dict[int, list[Interval]] = {}
    for rank, cats in of_rank.items():
        comm_of[rank] = union(s for c in COMM_CATS for s in cats.get(c, []))
        waiting = union([*cats.get("wait", []), *cats.get("launch", []),
                         *cats.get(BUBBLE, [])])
        busy = subtract(union(cats.get(COMPUTE, [])), waiting)
        hidden_of[rank] = intersect(comm_of[rank], busy)
    rows: list[StepRow] = []
    totals = {"comm": 0.0, "exposed": 0.0, "data": 0.0, "time": 0.0}
    last_counts: dict[int, int] = dict.fromkeys(range(ranks), 0)
    for step in sorted({s for _, s in step_span}):
        comm = exposed = data = time_sum = 0.0
        slowest = 0.0
        for rank in range(ranks):
            if (rank, step) not in step_span:
                continue
            a, b = step_span[(rank, step)]
            c = length(clip(comm_of[rank], a, b))
            comm += c
            exposed += c - length(clip(hidden_of[rank], a, b))
            data += sum(y - x for x, y in spans[(rank, step)].get("data", []))
            time_sum += b - a
            slowest = max(slowest, b - a)
        arr = arrivals.get(step, {})
        last = max(arr, key=lambda r: arr[r]) if len(arr) > 1 else None
        if last is not None:
            last_counts[last] += 1
        rows.append(StepRow(
            step=step, time=slowest, comm=comm, exposed=exposed,
            hidden_frac=(comm - exposed) / comm if comm > 0 else None,
            data_share=data / time_sum if time_sum > 0 else 0.0, last_rank=last,
            late_by=(arr[last] - min(arr.values())) if last is not None else None,
        ))
        totals["comm"] += comm
        totals["exposed"] += exposed
        totals["data"] += data
        totals["time"] += time_sum
    buckets = []
    for b, nbytes, group in sorted(flights):
        times = flights[(b, nbytes, group)]
        median_ms = statistics.median(times)
        algbw = nbytes / (median_ms / 1000.0) / 1e9 if median_ms > 0 else 0.0
        busbw = algbw * 2 * (group - 1) / group if group > 1 else algbw
        buckets.append(BucketRow(b, nbytes, len(times), median_ms, min(times), algbw, busbw,
                                 busbw / peak_gbs if peak_gbs else None))
    clocks = doc["otherData"].get("clocks", [])
    n_rank_steps = max(len(step_span), 1)
    window = doc["otherData"].get("steps")
    return Summary(
        path=path, ranks=ranks, steps=rows, buckets=buckets,
        comm_ms=totals["comm"], exposed_ms=totals["exposed"],
        hidden_frac=(totals["comm"] - totals["exposed"]) / totals["comm"]
        if totals["comm"] > 0 else None,
        data_share=totals["data"] / totals["time"] if totals["time"] > 0 else 0.0,
        step_ms=totals["time"] / n_rank_steps,
        last_counts=last_counts,
        clock_bound_ms=max((c.get("bound_ns", 0) for c in clocks), default=0) / 1e6,
        collectives=[_collective(name, got, peak_gbs) for name, got in named.items()],
        notes=[str(n) for n in doc["otherData"].get("notes", [])],
        window=[int(w) for w in window] if isinstance(window, list) else None,
        stages=stage_rows(doc),
    )


def _collective(name: str, got: list[tuple[int, str, float, int]],
                peak_gbs: float | None) -> CollectiveRow:
    nbytes, op, _, ranks = got[0]  # ranks: the group's (args.ranks), else the trace's
    median_ms = statistics.median(t for _, _, t, _ in got)
    algbw = nbytes / (median_ms / 1000.0) / 1e9 if median_ms > 0 else 0.0
    factor = BUS_FACTOR[op](ranks) if op in BUS_FACTOR and ranks > 1 else 1.0
    return CollectiveRow(name, op, nbytes, len(got), median_ms, min(t for _, _, t, _ in got),
                         algbw, algbw * factor, algbw * factor / peak_gbs if peak_gbs else None)


def no_step_line(window: list[int] | None) -> str:
    """Why a trace holds no step: its window missed the run, or the run took none."""
    if window is None:
        return "no step was recorded: the run took no step while the timeline recorded"
    a, b = window
    steps = f"{a}:" if b >= 1 << 62 else f"{a}:{b}"
    return (f"no step was recorded: the window --timeline-steps {steps} holds no step that "
            f"the run took (it stopped before step {a}?); widen the window, e.g. "
            "--timeline-steps 0:10")


def _pct(x: float | None) -> str:
    return "     -" if x is None else f"{100 * x:6.1f}"


def format_summary(s: Summary, max_rows: int = 40) -> str:
    """The human-readable report: a row per step (the first and last ``max_rows / 2`` when
    there are more), then overall, stragglers, buckets."""
    steps = [r.step for r in s.steps]
    span = f"steps {steps[0]}..{steps[-1]} ({len(steps)})" if steps else "no step recorded"
    lines = [f"trace {s.path}: {s.ranks} ranks, {span}, clocks aligned within "
             f"{s.clock_bound_ms:.3f} ms", "",
             "  step   time ms   comm ms  exposed ms  hidden %  data %  last rank  late by ms"]
    if not s.steps:
        return "\n".join([*lines[:2], no_step_line(s.window), *_note_lines(s)])
    shown: list[StepRow | None] = list(s.steps)
    half = 0
    if len(shown) > max_rows:
        half = max(max_rows // 2, 1)
        shown = [*s.steps[:half], None, *s.steps[-half:]]
    for r in shown:
        if r is None:
            lines.append(f"   ... {len(s.steps) - 2 * half} more steps (--max-rows)")
            continue
        last = "-" if r.last_rank is None else str(r.last_rank)
        late = "-" if r.late_by is None else f"{r.late_by:.3f}"
        lines.append(f"{r.step:>6} {r.time:>9.3f} {r.comm:>9.3f} {r.exposed:>11.3f}    "
                     f"{_pct(r.hidden_frac)}  {_pct(r.data_share)} {last:>10} {late:>11}")
    if s.comm_ms > 0:
        comm = (f"communication {s.comm_ms:.3f} ms (all ranks), exposed {s.exposed_ms:.3f} ms, "
                f"hidden {_pct(s.hidden_frac).strip()}%")
    else:
        comm = "no communication was recorded in these steps"
    lines += ["", f"overall: mean step {s.step_ms:.3f} ms per rank; {comm}; data wait "
              f"{_pct(s.data_share).strip()}% of step time"]
    counted = sum(s.last_counts.values())
    if counted:
        parts = [f"rank {r} last in {n}/{counted}" for r, n in sorted(s.last_counts.items())]
        lines.append("stragglers (last into synchronize): " + ", ".join(parts))
    if s.buckets:
        lines += ["", "  bucket       bytes  flights  median ms  best ms  algbw GB/s  busbw GB/s"
                      "  of peak"]
        for b in s.buckets:
            peak = "-" if b.of_peak is None else f"{100 * b.of_peak:.1f}%"
            lines.append(f"{b.bucket:>8} {b.bytes:>11} {b.flights:>8} {b.median_ms:>10.3f} "
                         f"{b.best_ms:>8.3f} {b.algbw_gbs:>11.3f} {b.busbw_gbs:>11.3f} {peak:>8}")
    if s.collectives:
        width = max(10, *(len(c.name) for c in s.collectives))
        lines += ["", f"  {'collective':<{width}}  {'op':<14}       bytes  flights  median ms  "
                      "best ms  algbw GB/s  busbw GB/s  of peak"]
        for c in s.collectives:
            peak = "-" if c.of_peak is None else f"{100 * c.of_peak:.1f}%"
            lines.append(f"  {c.name:<{width}}  {c.op:<14} {c.bytes:>11} {c.flights:>8} "
                         f"{c.median_ms:>10.3f} {c.best_ms:>8.3f} {c.algbw_gbs:>11.3f} "
                         f"{c.busbw_gbs:>11.3f} {peak:>8}")
    return "\n".join([*lines, *stage_lines(s.stages), *_note_lines(s)])


def _note_lines(s: Summary) -> list[str]:
    return ["", *(f"not recorded: {n}" for n in s.notes)] if s.notes else []


def problems(doc: dict[str, Any], *, slack_us: float = 0.002) -> list[str]:
    """Check a trace's structure; returns one line per problem (empty: well formed).

    Spans on one track must nest or follow each other, a rank's steps must be in order, and
    every launch must have a completed flight starting with it on the same track.
    """
    out: list[str] = []
    tracks: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for ev in doc.get("traceEvents", []):
        if ev.get("ph") == "X":
            if ev.get("dur", -1) < 0 or "ts" not in ev:
                out.append(f"bad span {ev}")
                continue
            tracks[(int(ev["pid"]), int(ev["tid"]))].append(ev)
    for (pid, tid), evs in sorted(tracks.items()):
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict[str, Any]] = []
        for ev in evs:
            while stack and ev["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - slack_us:
                stack.pop()
            if stack and ev["ts"] + ev["dur"] > stack[-1]["ts"] + stack[-1]["dur"] + slack_us:
                top = stack[-1]
                out.append(f"rank {pid} track {tid}: {ev['name']!r} at {ev['ts']} overlaps "
                           f"{top['name']!r} at {top['ts']} without nesting in it")
            stack.append(ev)
        steps = [e for e in evs if e["cat"] == "step"]
        numbers = [e["args"]["step"] for e in steps]
        if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
            out.append(f"rank {pid}: steps out of order: {numbers}")
        flights = {e["ts"] for e in evs if e["cat"] in COMM_CATS}
        for e in evs:
            if e["cat"] == "launch" and e["ts"] not in flights:
                out.append(f"rank {pid} track {tid}: launch at {e['ts']} never completed")
    return out
