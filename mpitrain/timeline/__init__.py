"""Per-rank timelines of compute and communication (docs/profiling.md).

``session = start(comm, path, steps=(10, 20))`` (collective) returns a session whose
``recorder`` instrumented code records into (``engine.timeline = session.recorder``);
``session.stop()`` (collective) aligns the clocks and writes one Chrome trace on rank 0.
``python -m mpitrain trace summary PATH`` reads it back. Importing this package does no MPI work.
"""

from __future__ import annotations

from mpitrain.timeline.chrome import TraceSession, check_timeline_path, start, start_timeline
from mpitrain.timeline.recorder import NULL, NullRecorder, Recorder, Timeline, parse_steps

__all__ = ["NULL", "NullRecorder", "Recorder", "Timeline", "TraceSession", "check_timeline_path",
           "parse_steps", "start", "start_timeline"]
