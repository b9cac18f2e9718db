"""Reading strategies for sorted sample indices: coalesced runs, or cached whole chunks."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

#: a gap up to this many bytes between wanted samples is read through rather than skipped
GAP_BYTES = 256 * 1024


def copy_rows(out: np.ndarray, dest: np.ndarray, block: np.ndarray, rows: np.ndarray) -> None:
    """``out[dest] = block[rows]``, as one slice copy when both sides are contiguous."""
    n = len(rows)
    if n and rows[-1] - rows[0] == n - 1 and dest[-1] - dest[0] == n - 1:
        if n == 1 or (np.all(np.diff(rows) == 1) and np.all(np.diff(dest) == 1)):
            out[dest[0] : dest[0] + n] = block[rows[0] : rows[0] + n]
            return
    out[dest] = block[rows]


class ChunkCache:
    """A byte-bounded LRU of decoded chunk blocks (one stored chunk is read once while hot)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._blocks: OrderedDict[Any, np.ndarray] = OrderedDict()

    def get(self, key: Any, load: Callable[[], np.ndarray]) -> np.ndarray:
        """Return the block for ``key``, loading (and caching) it on a miss."""
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
            return block
        block = load()
        self._blocks[key] = block
        self.size += block.nbytes
        while self.size > self.capacity and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self.size -= old.nbytes
        return block


def segments(sorted_base: np.ndarray, shard_of: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Split sorted indices into [a, b) segments: one shard, gaps of at most ``max_gap``."""
    breaks = np.flatnonzero((np.diff(sorted_base) > max_gap) | (np.diff(shard_of) != 0)) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_base)]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if a < b]
