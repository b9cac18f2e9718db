"""A resumable distributed sampler: seeded epoch order, strided rank parts, global position."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mpitrain.data.sharding import SHUFFLE_MODES, epoch_order, rank_part
from mpitrain.errors import ConfigError, DataError, with_hint


class DistributedSampler:
    """Give rank ``rank`` of ``world_size`` its part of every epoch, batch by batch.

    The state is (epoch, global position, seed): after a restart with the same or a different
    number of ranks, :meth:`load_state_dict` continues the epoch where it stopped, so no sample
    is seen twice or skipped.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        *,
        seed: int = 0,
        shuffle: str = "global",
        drop_last: bool = False,
        chunk: int = 1024,
    ) -> None:
        if shuffle not in SHUFFLE_MODES:
            raise ConfigError(
                with_hint(f"shuffle {shuffle!r} is unknown", f"use one of {SHUFFLE_MODES}")
            )
        if num_samples <= 0:
            raise DataError(with_hint("the dataset is empty", "check the split and the manifest"))
        if drop_last and num_samples < world_size:
            raise DataError(
                with_hint(
                    f"{num_samples} samples cannot give each of {world_size} ranks one sample",
                    "use fewer ranks or more data",
                )
            )
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.chunk = chunk
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0
        self._order = None

    def order(self) -> np.ndarray:
        """Return this epoch's global order (computed once per epoch)."""
        if self._order is None:
            self._order = epoch_order(
                self.num_samples, self.seed, self.epoch, self.shuffle, self.chunk
            )
        return self._order

    def part(self) -> tuple[np.ndarray, np.ndarray]:
        """Return this rank's remaining (indices, mask) of the epoch."""
        return rank_part(self.order(), self.position, self.rank, self.world_size, self.drop_last)

    def num_batches(self, batch_size: int) -> int:
        """Return the batches left in this epoch (the same on every rank).

        With ``drop_last`` only full batches count: the tail of the epoch that does not fill
        ``world_size * batch_size`` samples is left out (as in torch's DataLoader).
        """
        n = len(self.part()[0])
        return n // batch_size if self.drop_last else -(-n // batch_size)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, mask) per batch from the current position; does not advance it."""
        idx, mask = self.part()
        end = self.num_batches(batch_size) * batch_size
        for k in range(0, min(end, len(idx)), batch_size):
            yield idx[k : k + batch_size], mask[k : k + batch_size]

    def check_batch(self, batch_size: int) -> None:
        """Raise DataError when ``drop_last`` leaves no batch at all (same on every rank)."""
        if self.drop_last and self.num_samples < self.world_size * batch_size:
            raise DataError(
                with_hint(
                    f"{self.num_samples} samples are fewer than ranks x batch "
                    f"({self.world_size} x {batch_size}) with drop_last",
                    "lower the batch size, use fewer ranks or more data",
                )
            )

    def advance(self, per_rank: int) -> None:
        """Record that every rank consumed ``per_rank`` more samples of this epoch."""
        remaining = self.num_samples - self.position
        self.position += min(per_rank * self.world_size, remaining)

    def state_dict(self) -> dict[str, Any]:
        """Return (epoch, global position, seed, shuffle): all a restart needs."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (any world size)."""
        if int(state["num_samples"]) != self.num_samples:
            raise DataError(
                with_hint(
                    f"sampler state is for {state['num_samples']} samples, dataset has "
                    f"{self.num_samples}",
                    "resume with the same dataset and split",
                )
            )
        self.seed = int(state["seed"])
        self.shuffle = str(state["shuffle"])
        self.epoch = int(state["epoch"])
        self._order = None
        self.position = int(state["position"])
