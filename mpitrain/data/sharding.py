"""Pure sharding math: the epoch's global order and each rank's strided part of it.

Global position ``p`` of the remaining order goes to rank ``p % N``. Batch ``k`` of every rank
together is then the contiguous global slice ``[k*N*b, (k+1)*N*b)``, so the order of samples is
the same for any number of ranks and a run can resume at any global position with any N.
"""

from __future__ import annotations

import numpy as np

SHUFFLE_MODES = ("global", "chunk", "none")


def epoch_order(
    n: int, seed: int, epoch: int, shuffle: str, chunk: int = 1024, window: int = 8
) -> np.ndarray:
    """Return the order of sample indices ``0..n-1`` for one epoch.

    ``global``: a seeded uniform permutation. ``chunk``: a seeded permutation of runs of
    ``chunk`` consecutive indices, then a shuffle within each window of ``window`` runs, so a
    reader touches each stored chunk once per epoch (see docs/data.md). ``none``: ``arange(n)``.
    """
    if shuffle == "none":
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if shuffle == "global":
        return rng.permutation(n).astype(np.int64)
    if shuffle != "chunk":
        raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, not {shuffle!r}")
    starts = rng.permutation(np.arange(0, n, chunk))
    runs = [np.arange(s, min(s + chunk, n), dtype=np.int64) for s in starts]
    out = []
    for w in range(0, len(runs), window):
        block = np.concatenate(runs[w : w + window])
        out.append(rng.permutation(block))
    return np.concatenate(out) if out else np.arange(0, dtype=np.int64)


def rank_part(
    order: np.ndarray, position: int, rank: int, world: int, drop_last: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Return this rank's (indices, mask) of ``order[position:]``.

    Every rank gets the same length: with ``drop_last`` the tail that does not fill all ranks is
    left out; otherwise it is padded with samples from the start of ``order`` (mask False).
    """
    remaining = order[position:]
    m = len(remaining)
    per = m // world if drop_last else -(-m // world)
    idx = np.arange(per, dtype=np.int64) * world + rank
    real = idx < m
    if len(order):
        picked = np.where(real, remaining[np.minimum(idx, max(m - 1, 0))], order[idx % len(order)])
    else:
        picked = idx
    return picked.astype(np.int64), real
