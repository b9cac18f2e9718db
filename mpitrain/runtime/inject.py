"""Fault injection for tests and ``bench recovery``: a rank kills itself at a chosen point.

``MPITRAIN_KILL_AT="R[+R...]:STEP[:PHASE][,...]"`` — the ranks (numbered as launched:
``OMPI_COMM_WORLD_RANK``/``PMI_RANK``, which survive a shrink) ``SIGKILL`` themselves when
the loop reaches optimizer step ``STEP`` (steps done so far) at ``PHASE``: ``step`` (before
the step's forward, the default) or ``checkpoint`` (inside a checkpoint write, after the
state was gathered and before the file is renamed into place). ``2+3:20`` loses two ranks
at once (a node of two); ``1:10,2:30`` two failures one after the other. Each kill first
prints ``mpitrain: fault injection: launch rank R killed at step S (PHASE) t=UNIX`` on stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mpitrain.runtime import env

PHASES = ("step", "checkpoint")


def _targets(spec: str) -> list[tuple[set[int], int, str]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        ranks, step, *phase = item.split(":")
        where = phase[0] if phase else "step"
        if where not in PHASES or len(phase) > 1:
            raise ValueError(f"MPITRAIN_KILL_AT item {item!r}: phase must be one of {PHASES}")
        out.append(({int(r) for r in ranks.split("+")}, int(step), where))
    return out


def kill_point(phase: str, step: int) -> None:
    """SIGKILL this process if ``MPITRAIN_KILL_AT`` names it at ``phase`` of ``step``."""
    spec = env.get("kill_at")
    if not spec:
        return
    me = env.get_int("launcher_rank")
    for ranks, at, where in _targets(spec):
        if me in ranks and at == step and where == phase:
            sys.stderr.write(f"mpitrain: fault injection: launch rank {me} killed at step "
                             f"{step} ({phase}) t={time.time():.6f}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
