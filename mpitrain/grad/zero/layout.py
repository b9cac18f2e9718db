"""Where every parameter lives in the flat, padded, sharded buffers (pure math, no MPI).

Parameters that require grad are taken in reverse registration order (roughly the order
autograd finishes them) and laid end to end in ONE flat buffer, without gaps. The buffer is cut
into buckets of equal size ``S`` (a multiple of the number of ranks ``n``, about
``bucket_bytes``), the last one shorter and padded to a multiple of ``n``; padding (fewer than
``n`` elements in all) is zero and never reaches a user-visible tensor. Bucket boundaries do
not follow parameter boundaries: a large parameter spans several buckets, so no bucket (and no
transient stage-2 gradient buffer) is larger than ``S``. Each bucket is split into ``n`` equal
chunks; rank ``r`` owns chunk ``r`` of every bucket,
``full[offset_b + r * chunk_b : offset_b + (r + 1) * chunk_b]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    """One parameter's place: offset in the full flat buffer, shape, elements, buckets."""

    name: str
    offset: int
    shape: tuple[int, ...]
    numel: int
    buckets: tuple[int, ...]  # the buckets this parameter overlaps (in order)


@dataclass(frozen=True)
class BucketSpan:
    """One bucket: the parameters overlapping it and its padded geometry."""

    index: int
    params: tuple[int, ...]  # indices into the layout's slots
    numel: int  # unpadded elements
    chunk: int  # elements per rank (padded numel / ranks)
    offset: int  # start in the full flat buffer

    def padded(self, ranks: int) -> int:
        """Elements of the padded bucket."""
        return self.chunk * ranks


@dataclass(frozen=True)
class ShardLayout:
    """The full layout for ``ranks`` ranks (same on every rank)."""

    ranks: int
    slots: tuple[Slot, ...]  # in registration order (index = parameter index)
    buckets: tuple[BucketSpan, ...]

    @property
    def total(self) -> int:
        """Elements of the full padded flat buffer."""
        return sum(b.padded(self.ranks) for b in self.buckets)

    @property
    def numel(self) -> int:
        """Elements of all parameters (no padding)."""
        return sum(s.numel for s in self.slots)

    def shard_numel(self) -> int:
        """Elements each rank owns (the same on every rank, padding included)."""
        return sum(b.chunk for b in self.buckets)

    def full_range(self, i: int) -> tuple[int, int]:
        """``[start, end)`` of parameter ``i`` in the full flat buffer."""
        s = self.slots[i]
        return s.offset, s.offset + s.numel

    def shard_range(self, b: int, rank: int) -> tuple[int, int]:
        """``[start, end)`` of ``rank``'s chunk of bucket ``b`` in the full flat buffer."""
        span = self.buckets[b]
        start = span.offset + rank * span.chunk
        return start, start + span.chunk

    def pieces(self, i: int) -> list[tuple[int, int, int]]:
        """Return parameter ``i``'s consecutive pieces as ``(bucket, start in bucket, length)``."""
        s = self.slots[i]
        out = []
        for b in s.buckets:
            span = self.buckets[b]
            lo = max(s.offset, span.offset)
            hi = min(s.offset + s.numel, span.offset + span.numel)
            out.append((b, lo - span.offset, hi - lo))
        return out

    def manifest(self) -> dict[str, Any]:
        """JSON-ready description (for sharded checkpoints)."""
        return {
            "numel": self.numel,
            "buckets": [[span.offset, span.chunk] for span in self.buckets],
            "params": [[s.name, list(s.shape), s.offset] for s in self.slots],
        }


def plan_layout(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    ranks: int,
    bucket_bytes: int,
    itemsize: int = 4,
) -> ShardLayout:
    """Lay out parameters (registration order) into equal padded buckets for ``ranks`` ranks."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    numels = [_numel(s) for s in shapes]
    offsets = [0] * len(names)
    at = 0
    for i in reversed(range(len(names))):
        offsets[i] = at
        at += numels[i]
    total = at
    size = max(ranks, (bucket_bytes // itemsize) // ranks * ranks)
    spans: list[BucketSpan] = []
    start = 0
    while start < total or not spans:
        n = min(size, total - start)
        chunk = -(-n // ranks)
        members = tuple(
            i for i in reversed(range(len(names)))
            if numels[i] and offsets[i] < start + n and offsets[i] + numels[i] > start
        )
        spans.append(BucketSpan(len(spans), members, n, chunk, start))
        start += chunk * ranks if n < size else size
        if n < size:
            break
    slots = tuple(
        Slot(names[i], offsets[i], tuple(shapes[i]), numels[i],
             tuple(b.index for b in spans if i in b.params))
        for i in range(len(names))
    )
    return ShardLayout(ranks, slots, tuple(spans))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_grouped_layout(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    ranks: int,
    groups: Sequence[Sequence[int]],
) -> ShardLayout:
    """Lay out parameters with one bucket per group (ZeRO-3's units), last group first.

    ``groups`` partition the parameter indices (registration order). Each bucket holds one
    group's parameters end to end (reverse registration order inside it, as
    :func:`plan_layout`), padded to a multiple of ``ranks``; bucket 0 is the last group, the
    one whose backward runs first.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(len(names))):
        raise ValueError("the groups must partition the parameters (each index once)")
    numels = [_numel(s) for s in shapes]
    offsets = [0] * len(names)
    spans: list[BucketSpan] = []
    bucket_of = [0] * len(names)
    at = 0
    for group in reversed([g for g in groups if g]):
        start = at
        for i in sorted(group, reverse=True):
            offsets[i] = at
            at += numels[i]
            bucket_of[i] = len(spans)
        n = at - start
        chunk = max(1, -(-n // ranks))
        spans.append(BucketSpan(len(spans), tuple(sorted(group, reverse=True)), n, chunk, start))
        at = start + chunk * ranks
    slots = tuple(
        Slot(names[i], offsets[i], tuple(shapes[i]), numels[i], (bucket_of[i],))
        for i in range(len(names))
    )
    return ShardLayout(ranks, slots, tuple(spans))
