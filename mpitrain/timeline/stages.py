"""Model parallelism as the trace saw it: per pipeline stage, the bubble, the tensor-parallel
communication and the pipeline's sends and receives.

What the grid records (``mpitrain.parallel``):

- each blocking receive of a pipeline stage (the activation from the previous stage, the
  gradient from the next) as a ``bubble`` span carrying ``args.stage``, with the receive itself
  nested in it as a named flight (op ``recv``);
- each send as a named flight (op ``send``) from its ``Isend`` to observed completion (tested
  after the start and at the stage's next send or receive, waited at the end of the schedule);
  sends and receives carry ``args.group == "pipeline"``, ``args.peer`` (the other stage) and
  ``args.stage`` (this one), and their bytes are the tensor's;
- each tensor-parallel collective (the column/row layers' all-reduces, the sequence-parallel
  all-gathers and reduce-scatters, the vocabulary-parallel loss) as a blocking named flight with
  ``args.group == "tensor"`` and ``args.ranks`` (the tensor group's size).

Per rank and step: the *bubble share* is the time in bubble spans over the step's time; the
*tensor-parallel time* the union of its tensor-group flights inside the step; the *send/recv
time* the union of its send and receive flights inside the step (a receive is blocking, so its
time is also bubble: the bubble is the part of send/recv time the stage spent idle); *send/recv
bytes* what those flights of the step moved. A stage's value is the median over its ranks and
steps (the tensor and data-parallel copies of a stage see the same schedule); the bubble's worst
is kept too. A rank that recorded no stage (tensor parallelism without a pipeline) is stage 0.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from mpitrain.timeline.intervals import Interval, clip, length, union

BUBBLE = "bubble"
#: ``args.group`` of the tensor-parallel collectives
TENSOR = "tensor"
#: ``args.group`` of the pipeline's sends, receives and loss broadcast
PIPELINE = "pipeline"
#: ``args.op`` of the pipeline's point-to-point flights
P2P_OPS = ("send", "recv")


@dataclass
class StageRow:
    """One pipeline stage over its ranks' steps (medians; ``worst``: the largest bubble)."""

    stage: int
    median: float  #: bubble share of the step
    worst: float
    samples: int  #: rank-steps
    tensor_ms: float = 0.0
    tensor_share: float = 0.0
    p2p_ms: float = 0.0
    p2p_share: float = 0.0
    p2p_bytes: int = 0


class _Rank:
    """One rank's spans by kind, and the bytes its sends and receives moved per step."""

    def __init__(self) -> None:
        self.stage: int | None = None
        self.model_parallel = False
        self.steps: list[tuple[int, Interval]] = []
        self.kinds: dict[str, list[Interval]] = defaultdict(list)
        self.p2p_bytes: dict[int, int] = defaultdict(int)


def _kind(ev: dict[str, Any]) -> str | None:
    """Which column a span counts in (None: none)."""
    if ev["cat"] == BUBBLE:
        return BUBBLE
    if ev["cat"] != "comm":
        return None
    args = ev["args"]
    if args.get("op") in P2P_OPS:
        return "p2p"
    return TENSOR if args.get("group") == TENSOR else None


def _ranks(doc: dict[str, Any]) -> dict[int, _Rank]:
    ranks: dict[int, _Rank] = defaultdict(_Rank)
    for ev in doc["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        r = ranks[int(ev["pid"])]
        a = ev["ts"] / 1000.0
        span = (a, a + ev["dur"] / 1000.0)
        if ev["cat"] == "step":
            r.steps.append((int(ev["args"].get("step", -1)), span))
            continue
        kind = _kind(ev)
        if kind is None:
            continue
        r.model_parallel = True
        r.kinds[kind].append(span)
        if "stage" in ev["args"]:
            r.stage = int(ev["args"]["stage"])
        if kind == "p2p":
            r.p2p_bytes[int(ev["args"].get("step", -1))] += int(ev["args"].get("bytes", 0))
    return ranks


def stage_rows(doc: dict[str, Any]) -> list[StageRow]:
    """Return each stage's row (empty when the trace holds no model parallelism)."""
    # stage -> column -> values over its rank-steps
    got: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _ranks(doc).values():
        if not r.model_parallel:
            continue
        merged = {k: union(v) for k, v in r.kinds.items()}
        col = got[r.stage or 0]
        for step, (a, b) in r.steps:
            if b <= a:
                continue
            ms = {k: length(clip(merged.get(k, []), a, b)) for k in (BUBBLE, TENSOR, "p2p")}
            col[BUBBLE].append(ms[BUBBLE] / (b - a))
            col[TENSOR].append(ms[TENSOR])
            col["tensor share"].append(ms[TENSOR] / (b - a))
            col["p2p"].append(ms["p2p"])
            col["p2p share"].append(ms["p2p"] / (b - a))
            col["bytes"].append(float(r.p2p_bytes.get(step, 0)))
    med = statistics.median
    return [StageRow(s, med(c[BUBBLE]), max(c[BUBBLE]), len(c[BUBBLE]), med(c[TENSOR]),
                     med(c["tensor share"]), med(c["p2p"]), med(c["p2p share"]),
                     round(med(c["bytes"])))
            for s, c in sorted(got.items()) if c[BUBBLE]]


def stage_lines(rows: list[StageRow]) -> list[str]:
    """The report's table of stages (none without model parallelism)."""
    if not rows:
        return []
    lines = ["", "model parallelism per stage (median over its ranks' steps; bubble: share of "
             "the step waiting in receives)",
             "  stage  rank-steps  bubble %  worst %  tensor-parallel ms      %  "
             "send/recv ms      %  send/recv bytes"]
    for r in rows:
        lines.append(f"{r.stage:>7} {r.samples:>11} {100 * r.median:>9.1f} {100 * r.worst:>8.1f}"
                     f" {r.tensor_ms:>19.3f} {100 * r.tensor_share:>6.1f} {r.p2p_ms:>13.3f}"
                     f" {100 * r.p2p_share:>6.1f} {r.p2p_bytes:>16}")
    return lines
