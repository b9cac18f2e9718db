"""The pipeline bubble as the trace saw it: each stage's share of its steps spent waiting.

A pipeline stage records its blocking receives (the activation from the previous stage, the
gradient from the next) as ``bubble`` spans carrying ``args.stage``
(``mpitrain.parallel.pipeline``). Per rank and step, the bubble share is the time in those
spans over the step's time; a stage's share is the median over its ranks and steps (the
tensor and data-parallel copies of a stage see the same schedule).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from mpitrain.timeline.intervals import Interval, clip, length, union

BUBBLE = "bubble"


@dataclass
class StageBubble:
    """One pipeline stage: its median and largest bubble share over its ranks' steps."""

    stage: int
    median: float
    worst: float
    samples: int


def stage_bubbles(doc: dict[str, Any]) -> list[StageBubble]:
    """Return each stage's bubble share (empty when the trace holds no pipeline)."""
    stage_of: dict[int, int] = {}
    waits: dict[int, list[Interval]] = defaultdict(list)
    steps: dict[int, list[Interval]] = defaultdict(list)
    for ev in doc["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        rank = int(ev["pid"])
        a = ev["ts"] / 1000.0
        span = (a, a + ev["dur"] / 1000.0)
        if ev["cat"] == BUBBLE:
            stage_of[rank] = int(ev["args"].get("stage", 0))
            waits[rank].append(span)
        elif ev["cat"] == "step":
            steps[rank].append(span)
    shares: dict[int, list[float]] = defaultdict(list)
    for rank, stage in stage_of.items():
        merged = union(waits[rank])
        for a, b in steps[rank]:
            if b > a:
                shares[stage].append(length(clip(merged, a, b)) / (b - a))
    return [StageBubble(s, statistics.median(v), max(v), len(v))
            for s, v in sorted(shares.items()) if v]


def bubble_lines(rows: list[StageBubble]) -> list[str]:
    """The report's lines for the pipeline bubble (none without a pipeline)."""
    if not rows:
        return []
    parts = [f"stage {r.stage} {100 * r.median:.1f}% (worst {100 * r.worst:.1f}%)"
             for r in rows]
    return ["", "pipeline bubble (share of the step waiting in receives, median over steps): "
            + ", ".join(parts)]
