"""Pipeline schedules as plain action lists (pure: no MPI, no torch).

A stage runs its list in order: ``F i`` forwards micro-batch i (receiving its input from the
previous stage), ``B i`` runs its backward (receiving the output gradient from the next
stage). Sends never block (``Isend``), receives do; a list is valid when the dependency
graph is acyclic, which :func:`simulate` checks.

With virtual stages (the interleaved schedule, Megatron-LM's layout) rank ``s`` of ``P``
holds ``v`` model chunks; chunk ``c`` is global stage ``c * P + s``, and an action names its
chunk (``Action("F", i, c)``). Global stage ``g`` receives from ``g - 1`` and sends to
``g + 1``: the last rank's chunk ``c`` feeds rank 0's chunk ``c + 1``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from mpitrain.errors import with_hint


class Action(NamedTuple):
    """One step of a stage's schedule."""

    kind: str  # "F" or "B"
    micro: int
    chunk: int = 0  # the model chunk (virtual stage) on this rank


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


def interleaved(stage: int, stages: int, micro: int, virtual: int) -> list[Action]:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline): ``virtual`` chunks per rank.

    Forwards go through the chunks in groups of ``stages`` micro-batches (chunk 0 for
    micro-batches 0..P-1, chunk 1 for the same, ..., then the next group); backwards the
    same with the chunks reversed. Warm-up: ``2 (P - stage - 1) + (v - 1) P`` forwards, then
    one forward, one backward. ``virtual == 1`` is :func:`one_f_one_b`.

    Raises:
        ValueError: ``virtual < 1``, or ``virtual > 1`` with ``micro`` not a multiple of
            ``stages`` (the groups must be whole, as in Megatron-LM).
    """
    if virtual < 1:
        raise ValueError(f"virtual stages must be >= 1, got {virtual}")
    if virtual == 1:
        return one_f_one_b(stage, stages, micro)
    if micro % stages:
        raise ValueError(with_hint(
            f"the interleaved schedule needs the micro-batch count ({micro}) to be a multiple "
            f"of the pipeline stages ({stages})",
            f"use {micro + stages - micro % stages} micro-batches, or 1 virtual stage"))
    group, total = stages * virtual, micro * virtual

    def action(kind: str, k: int) -> Action:
        c = (k % group) // stages
        chunk = c if kind == "F" else virtual - 1 - c
        return Action(kind, (k // group) * stages + k % stages, chunk)

    warm = min(2 * (stages - stage - 1) + (virtual - 1) * stages, total)
    out = [action("F", k) for k in range(warm)]
    for k in range(total - warm):
        out += [action("F", warm + k), action("B", k)]
    return out + [action("B", k) for k in range(total - warm, total)]


SCHEDULES: dict[str, Schedule] = {"gpipe": gpipe, "1f1b": one_f_one_b}
#: schedules of several chunks per rank: ``factory(virtual)`` gives the :data:`Schedule`
VIRTUAL_SCHEDULES: dict[str, Callable[[int], Schedule]] = {
    "interleaved": lambda virtual: partial(interleaved, virtual=virtual)}


def get_schedule(name: str, virtual: int = 1) -> Schedule:
    """Return the schedule called ``name`` for ``virtual`` chunks per rank.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or ``virtual > 1``
            with a schedule of one chunk per rank.
    """
    if name in VIRTUAL_SCHEDULES:
        return VIRTUAL_SCHEDULES[name](virtual)
    if name not in SCHEDULES:
        known = ", ".join(sorted(SCHEDULES.keys() | VIRTUAL_SCHEDULES.keys()))
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {known}")
    if virtual != 1:
        raise ValueError(with_hint(f"the {name} schedule runs one chunk per rank, not {virtual}",
                                   "use the interleaved schedule for virtual stages"))
    return SCHEDULES[name]


def peak_in_flight(actions: list[Action], chunk: int | None = None) -> int:
    """Most activations held at once: (chunk, micro-batch) pairs forwarded and not yet
    backwarded, over every chunk or only ``chunk``'s.

    With ``v`` chunks one pair holds a chunk's activations (1/v of the rank's layers), so the
    total over chunks divided by ``v`` is the peak in micro-batches of a whole stage.
    """
    live = peak = 0
    for a in actions:
        if chunk is None or a.chunk == chunk:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
    return peak


def bubble_theory(stages: int, micro: int, virtual: int = 1) -> float:
    """The idle fraction of a flushed pipeline with equal stages: (P - 1) / (v m + P - 1)
    (``virtual`` chunks per rank cut the warm-up and drain to 1/v of a stage's time)."""
    return (stages - 1) / (virtual * micro + stages - 1)


def simulate(
    schedule: Schedule, stages: int, micro: int, t_fwd: float = 1.0, t_bwd: float = 2.0, *,
    ordered_sends: bool = False,
) -> tuple[float, float]:
    """Replay ``schedule`` with fixed action times; return (makespan, bubble fraction).

    ``t_fwd`` and ``t_bwd`` are a whole stage's times; with ``v`` chunks per rank (read from
    the lists' chunk indices) one chunk's action takes 1/v of them. F of global stage ``g``
    waits for F of ``g - 1``, B of ``g`` for B of ``g + 1``, the last global stage's B for
    its own F. ``ordered_sends``: each rank's sends complete one at a time, in the order it
    started them, each only when its receiver takes it (blocking sends on one communication
    thread, ``progress="thread"``, without eager buffering: the worst case).

    Raises RuntimeError if the stages' lists deadlock (a receive that can never be matched).
    """
    lists = [schedule(s, stages, micro) for s in range(stages)]
    virtual = 1 + max((a.chunk for actions in lists for a in actions), default=0)
    last = virtual * stages - 1
    done: dict[tuple[str, int, int], float] = {}
    sends: list[deque[tuple[str, int, int]]] = [deque() for _ in range(stages)]
    clock = [0.0] * stages
    pos = [0] * stages
    while any(pos[s] < len(lists[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            if pos[s] == len(lists[s]):
                continue
            a = lists[s][pos[s]]
            g = a.chunk * stages + s
            if a.kind == "F":
                dep = ("F", g - 1, a.micro) if g > 0 else None
            else:
                dep = ("B", g + 1, a.micro) if g < last else ("F", g, a.micro)
            if dep is not None and dep not in done:
                continue
            if ordered_sends and dep is not None and dep[1] != g:  # a message: first in line?
                queue = sends[dep[1] % stages]
                if not queue or queue[0] != dep:
                    continue
                queue.popleft()
            start = max(clock[s], done[dep] if dep is not None else 0.0)
            clock[s] = start + (t_fwd if a.kind == "F" else t_bwd) / virtual
            done[(a.kind, g, a.micro)] = clock[s]
            if (a.kind == "F" and g < last) or (a.kind == "B" and g > 0):
                sends[s].append((a.kind, g, a.micro))
            pos[s] += 1
            moved = True
        if not moved:
            how = " (sends in order)" if ordered_sends else ""
            raise RuntimeError(f"schedule deadlocks at positions {pos}{how}")
    makespan = max(clock)
    busy = micro * (t_fwd + t_bwd)
    return makespan, 1.0 - busy / makespan
