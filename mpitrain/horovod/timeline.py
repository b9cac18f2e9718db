"""``hvd.start_timeline``/``stop_timeline`` on mpitrain's profiler (:mod:`mpitrain.timeline`).

Horovod's timeline records its coordinator's phases per tensor; here every Horovod collective
is one ``comm`` span (agreement to completion, named ``hvd.<op> <name>``) and the buckets of
every ``hvd.DistributedOptimizer`` record their launch/flight/wait spans, in mpitrain's merged
Chrome trace (clocks aligned across ranks; ``python -m mpitrain trace summary PATH``).
"""

from __future__ import annotations

from mpitrain.horovod import context as _c
from mpitrain.timeline import NULL, start


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Collective (every rank): start recording a timeline to ``file_path``.

    ``mark_cycles`` is accepted for compatibility (there are no coordinator cycles).
    """
    ctx = _c.context()
    if ctx.trace is not None:
        raise ValueError("hvd.start_timeline: a timeline is already recording; "
                         "call hvd.stop_timeline() first")
    ctx.agree("hvd.start_timeline")
    ctx.trace = start(ctx.world.comm, file_path)
    ctx.timeline = ctx.trace.recorder
    if ctx.engine.thread is not None:  # its queue waits and runs, on their own track
        ctx.engine.thread.timeline = ctx.timeline
    for engine in list(ctx.engines):
        engine.timeline = ctx.timeline


def stop_timeline() -> None:
    """Collective (every rank): stop recording and write the merged trace (rank 0)."""
    ctx = _c.context()
    ctx.agree("hvd.stop_timeline")
    trace, ctx.trace = ctx.trace, None
    ctx.timeline = NULL
    if ctx.engine.thread is not None:
        ctx.engine.thread.timeline = NULL
    for engine in list(ctx.engines):
        engine.timeline = NULL
    if trace is not None:
        trace.stop()
