"""Pipeline schedules as plain action lists (pure: no MPI, no torch).

A stage runs its list in order: ``F i`` forwards micro-batch i (receiving its input from the
previous stage), ``B i`` runs its backward (receiving the output gradient from the next
stage). Sends never block (``Isend``), receives do; a list is valid when the dependency
graph is acyclic, which :func:`simulate` checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Action(NamedTuple):
    """One step of a stage's schedule."""

    kind: str  # "F" or "B"
    micro: int


Schedule = Callable[[int, int, int], list[Action]]


def gpipe(stage: int, stages: int, micro: int) -> list[Action]:
    """GPipe: every forward, then every backward (holds all ``micro`` activations)."""
    return [Action("F", i) for i in range(micro)] + [Action("B", i) for i in range(micro)]


def one_f_one_b(stage: int, stages: int, micro: int) -> list[Action]:
    """1F1B (PipeDream-flush): ``stages - stage - 1`` warm-up forwards, then alternate.

    At most ``stages - stage`` micro-batches are in flight on a stage (<= P).
    """
    warm = min(stages - stage - 1, micro)
    out = [Action("F", i) for i in range(warm)]
    for i in range(micro - warm):
        out += [Action("F", warm + i), Action("B", i)]
    out += [Action("B", i) for i in range(micro - warm, micro)]
    return out


SCHEDULES: dict[str, Schedule] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def get_schedule(name: str) -> Schedule:
    """Return the schedule called ``name`` (a ValueError lists the known ones)."""
    try:
        return SCHEDULES[name]
    except KeyError:
        known = ", ".join(sorted(SCHEDULES))
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {known}") from None


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches forwarded but not yet backwarded at once."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_theory(stages: int, micro: int) -> float:
    """The idle fraction of a flushed pipeline with equal stages: (P - 1) / (m + P - 1)."""
    return (stages - 1) / (micro + stages - 1)


def simulate(
    schedule: Schedule, stages: int, micro: int, t_fwd: float = 1.0, t_bwd: float = 2.0
) -> tuple[float, float]:
    """Replay ``schedule`` with fixed action times; return (makespan, bubble fraction).

    Raises RuntimeError if the stages' lists deadlock (a receive that can never be matched).
    """
    lists = [schedule(s, stages, micro) for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * stages
    pos = [0] * stages
    while any(pos[s] < len(lists[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            if pos[s] == len(lists[s]):
                continue
            a = lists[s][pos[s]]
            if a.kind == "F":
                dep = ("F", s - 1, a.micro) if s > 0 else None
            else:
                dep = ("B", s + 1, a.micro) if s < stages - 1 else ("F", s, a.micro)
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done[dep] if dep is not None else 0.0)
            clock[s] = start + (t_fwd if a.kind == "F" else t_bwd)
            done[(a.kind, s, a.micro)] = clock[s]
            pos[s] += 1
            moved = True
        if not moved:
            raise RuntimeError(f"schedule deadlocks at positions {pos}")
    makespan = max(clock)
    busy = micro * (t_fwd + t_bwd)
    return makespan, 1.0 - busy / makespan
