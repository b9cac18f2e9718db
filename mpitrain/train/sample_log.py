"""``--sample-log PATH``: every rank appends the samples it trains on, to audit data coverage.

One line per micro-batch in ``PATH.rankR``: ``epoch step world_size index index ...`` (global
dataset indices, padding left out). Lines are flushed as written, so after a preemption the
file holds exactly the steps that ran; the test of elastic resume (4 -> 2 -> 3 nodes) reads
them to check that every sample of the epoch was trained on exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI


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

    def begin(self, comm: MPI.Intracomm) -> None:
        """Collective: start an incarnation of the run (a launch, a resume, a shrunk world):
        its lines follow a ``# generation G`` line, G rank 0's clock on every rank, so a
        reader can drop the steps a later incarnation trained again (:func:`kept_rows`)."""
        generation = comm.bcast(time.time(), root=0)
        if self._file is not None:
            self._file.write(f"# generation {generation:.6f}\n")

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
    return [row for _, row in _rows(path)]


def _rows(path: str | Path) -> list[tuple[float, tuple[int, int, int, list[int]]]]:
    """``(generation, row)`` for every line of every ``PATH.rankR`` file."""
    prefix = Path(path)
    out = []
    for f in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        generation = 0.0
        for line in f.read_text(encoding="ascii").splitlines():
            if line.startswith("# generation "):
                generation = float(line.split()[2])
                continue
            e, s, w, *idx = line.split()
            out.append((generation, (int(e), int(s), int(w), [int(i) for i in idx])))
    return out


def kept_rows(path: str | Path) -> list[tuple[int, int, int, list[int]]]:
    """The rows of the steps whose training was kept: a step that a later incarnation trained
    again (it went back to an older checkpoint after a lost rank) counts from that one only."""
    rows = _rows(path)
    start: dict[float, int] = {}
    for generation, (_, step, _, _) in rows:
        start[generation] = min(step, start.get(generation, step))
    return [row for generation, row in rows
            if not any(g > generation and s <= row[1] for g, s in start.items())]
