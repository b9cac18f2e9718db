"""The ``--straggler-ms`` test option: which rank is slowed at a step."""

from __future__ import annotations

import numpy as np


def straggler_rank(kind: str, seed: int, step: int, size: int) -> int:
    """The rank that ``--straggler-ms`` slows at ``step``: the last, or a seeded random one
    (the same answer on every rank, no communication)."""
    if kind == "last":
        return size - 1
    return int(np.random.default_rng([seed, step, 7]).integers(size))
