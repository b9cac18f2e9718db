"""Interval arithmetic on sorted, disjoint (start, end) lists: what the summary measures with."""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[float, float]


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


def intersect(x: list[Interval], y: list[Interval]) -> list[Interval]:
    """The intersection of two sorted disjoint interval lists (sorted, disjoint)."""
    i = j = 0
    out: list[Interval] = []
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if hi > lo:
            out.append((lo, hi))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap(x: list[Interval], y: list[Interval]) -> float:
    """Length of the intersection of two sorted disjoint interval lists."""
    return length(intersect(x, y))


def subtract(x: list[Interval], y: list[Interval]) -> list[Interval]:
    """``x`` without ``y`` (both sorted and disjoint)."""
    out: list[Interval] = []
    j = 0
    for a, b in x:
        while j < len(y) and y[j][1] <= a:
            j += 1
        k = j
        while k < len(y) and y[k][0] < b:
            if y[k][0] > a:
                out.append((a, y[k][0]))
            a = max(a, y[k][1])
            k += 1
        if b > a:
            out.append((a, b))
    return out


def clip(x: list[Interval], a: float, b: float) -> list[Interval]:
    """The parts of sorted disjoint ``x`` inside ``[a, b]``."""
    return intersect(x, [(a, b)])
