"""Read a timeline trace and report where the time went: overlap, stragglers, buckets.

Definitions (per rank and step; summed over ranks for a step, over steps for the run):

- *communication*: the union of the step's bucket in-flight spans (launch to observed
  completion);
- *hidden*: the part of it that overlaps compute spans (forward, backward, optimizer step);
  *exposed* = communication - hidden; the *hidden fraction* = hidden / communication;
- *data-wait share*: time in "data wait" spans / step time;
- *last rank*: the rank that entered ``synchronize`` last (rank 0's clock); the others waited
  for it, ``late by`` = its arrival - the earliest arrival;
- per bucket: bytes, flights, median flight time, algorithm bandwidth bytes / time and bus
  bandwidth x 2(n-1)/n (what a ring all-reduce moves per rank), optionally against a peak.
  A flight ends when the engine observes completion (a later gradient hook or the wait in
  synchronize) and includes waiting for late ranks, so the bandwidth is a lower bound; the
  best (shortest) flight is the closest to the transport's own speed.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpitrain.errors import DataError, with_hint
from mpitrain.timeline.chrome import FORMAT

Interval = tuple[float, float]
COMPUTE = "compute"


def union(spans: Iterable[Interval]) -> list[Interval]:
    """Merge intervals into a sorted list of disjoint ones."""
    out: list[Interval] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def length(spans: Iterable[Interval]) -> float:
    """Total length of disjoint intervals."""
    return sum(b - a for a, b in spans)


def overlap(x: list[Interval], y: list[Interval]) -> float:
    """Length of the intersection of two sorted disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if hi > lo:
            total += hi - lo
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def load(path: Path) -> dict[str, Any]:
    """Read and check a trace file written by mpitrain.

    Raises:
        DataError: unreadable, not JSON, or not an mpitrain timeline.
    """
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read trace '{path}': {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(with_hint(f"trace '{path}' is not JSON ({exc})",
                                  "was the run killed before it wrote the timeline?")) from exc
    fmt = doc.get("otherData", {}).get("format") if isinstance(doc, dict) else None
    if fmt != FORMAT:
        raise DataError(with_hint(f"trace '{path}' is not an mpitrain timeline (format {fmt!r})",
                                  "write one with: python -m mpitrain --timeline PATH ..."))
    return doc


def summarize(doc: dict[str, Any], *, path: str = "", peak_gbs: float | None = None) -> Summary:
    """Compute the report from a loaded trace (see the module docstring for definitions)."""
    ranks = int(doc["otherData"]["ranks"])
    # (rank, step) -> category -> spans (ms)
    spans: dict[tuple[int, int], dict[str, list[Interval]]] = defaultdict(lambda: defaultdict(list))
    arrivals: dict[int, dict[int, float]] = defaultdict(dict)
    step_time: dict[tuple[int, int], float] = {}
    flights: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for ev in doc["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        rank, step = int(ev["pid"]), int(ev["args"].get("step", -1))
        a = ev["ts"] / 1000.0
        b = a + ev["dur"] / 1000.0
        cat = ev["cat"]
        spans[(rank, step)][cat].append((a, b))
        if cat == "step":
            step_time[(rank, step)] = b - a
        elif cat == "sync":
            arrivals[step].setdefault(rank, a)
        elif cat == "bucket":
            flights[int(ev["args"]["bucket"])].append((int(ev["args"]["bytes"]), b - a))
    rows: list[StepRow] = []
    totals = {"comm": 0.0, "exposed": 0.0, "data": 0.0, "time": 0.0}
    last_counts: dict[int, int] = dict.fromkeys(range(ranks), 0)
    for step in sorted({s for _, s in step_time}):
        comm = exposed = data = time_sum = 0.0
        slowest = 0.0
        for rank in range(ranks):
            if (rank, step) not in step_time:
                continue
            cats = spans[(rank, step)]
            c = union(cats.get("bucket", []))
            hidden = overlap(c, union(cats.get(COMPUTE, [])))
            comm += length(c)
            exposed += length(c) - hidden
            data += sum(b - a for a, b in cats.get("data", []))
            time_sum += step_time[(rank, step)]
            slowest = max(slowest, step_time[(rank, step)])
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
    for b in sorted(flights):
        nbytes = flights[b][0][0]
        median_ms = statistics.median(t for _, t in flights[b])
        algbw = nbytes / (median_ms / 1000.0) / 1e9 if median_ms > 0 else 0.0
        busbw = algbw * 2 * (ranks - 1) / ranks if ranks > 1 else algbw
        best_ms = min(t for _, t in flights[b])
        buckets.append(BucketRow(b, nbytes, len(flights[b]), median_ms, best_ms, algbw, busbw,
                                 busbw / peak_gbs if peak_gbs else None))
    clocks = doc["otherData"].get("clocks", [])
    n_rank_steps = max(len(step_time), 1)
    return Summary(
        path=path, ranks=ranks, steps=rows, buckets=buckets,
        comm_ms=totals["comm"], exposed_ms=totals["exposed"],
        hidden_frac=(totals["comm"] - totals["exposed"]) / totals["comm"]
        if totals["comm"] > 0 else None,
        data_share=totals["data"] / totals["time"] if totals["time"] > 0 else 0.0,
        step_ms=totals["time"] / n_rank_steps,
        last_counts=last_counts,
        clock_bound_ms=max((c.get("bound_ns", 0) for c in clocks), default=0) / 1e6,
    )


def _pct(x: float | None) -> str:
    return "     -" if x is None else f"{100 * x:6.1f}"


def format_summary(s: Summary, max_rows: int = 40) -> str:
    """The human-readable report: a row per step (the first and last ``max_rows / 2`` when
    there are more), then overall, stragglers, buckets."""
    steps = [r.step for r in s.steps]
    span = f"steps {steps[0]}..{steps[-1]} ({len(steps)})" if steps else "no complete steps"
    lines = [f"trace {s.path}: {s.ranks} ranks, {span}, clocks aligned within "
             f"{s.clock_bound_ms:.3f} ms", "",
             "  step   time ms   comm ms  exposed ms  hidden %  data %  last rank  late by ms"]
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
    lines += ["", f"overall: mean step {s.step_ms:.3f} ms per rank; communication "
              f"{s.comm_ms:.3f} ms (all ranks), exposed {s.exposed_ms:.3f} ms, hidden "
              f"{_pct(s.hidden_frac).strip()}%; data wait {_pct(s.data_share).strip()}% "
              "of step time"]
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
    return "\n".join(lines)


def problems(doc: dict[str, Any], *, slack_us: float = 0.002) -> list[str]:
    """Check a trace's structure; returns one line per problem (empty: well formed).

    Spans on one track must nest or follow each other, a rank's steps must be in order, and
    every bucket launch must have a completed flight starting with it on the same track.
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
        flights = {e["ts"] for e in evs if e["cat"] == "bucket"}
        for e in evs:
            if e["cat"] == "launch" and e["ts"] not in flights:
                out.append(f"rank {pid} track {tid}: launch at {e['ts']} never completed")
    return out
