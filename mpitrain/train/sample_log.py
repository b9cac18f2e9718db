"""``--sample-log PATH``: every rank appends the samples it trains on, to audit data coverage.

One line per micro-batch in ``PATH.rankR``: ``epoch step world_size index index ...`` (global
dataset indices, padding left out). Lines are flushed as written, so after a preemption the
file holds exactly the steps that ran; the test of elastic resume (4 -> 2 -> 3 nodes) reads
them to check that every sample of the epoch was trained on exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np

from mpitrain.errors import ConfigError, with_hint


class SampleLog:
    """Appends this rank's trained sample indices to ``PATH.rankR`` (None: does nothing)."""

    def __init__(self, path: str | None, rank: int, world_size: int) -> None:
        self.world_size = world_size
        self._file: IO[str] | None = None
        if path is not None:
            target = Path(f"{path}.rank{rank}")
            try:
                self._file = target.open("a", encoding="ascii")
            except OSError as exc:
                raise ConfigError(with_hint(
                    f"--sample-log: cannot append to {target} ({exc.strerror})",
                    "give a path in an existing, writable directory")) from None

    def write(self, epoch: int, step: int, index: np.ndarray, mask: np.ndarray) -> None:
        """Record one micro-batch (the real samples of it) of optimizer step ``step``."""
        if self._file is None:
            return
        real = index[mask.astype(bool)]
        self._file.write(f"{epoch} {step} {self.world_size} {' '.join(map(str, real))}\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_sample_log(path: str | Path) -> list[tuple[int, int, int, list[int]]]:
    """``(epoch, step, world size, indices)`` per micro-batch from every ``PATH.rankR`` file
    (every incarnation's lines, in file order per rank)."""
    prefix = Path(path)
    out = []
    for f in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for line in f.read_text(encoding="ascii").splitlines():
            e, s, w, *idx = line.split()
            out.append((int(e), int(s), int(w), [int(i) for i in idx]))
    return out
