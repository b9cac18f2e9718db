"""``BatchLoader``: whole-batch reads, prefetched by a background thread, resumable."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpitrain.data.dataset import ShardedDataset
from mpitrain.data.sampler import DistributedSampler


@dataclass
class Batch:
    """One batch: inputs, labels and a mask that is False for padding samples."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


_DONE = object()


class BatchLoader:
    """Iterate a rank's batches of ``dataset`` in ``sampler`` order.

    A daemon thread reads up to ``prefetch`` batches ahead (one slice per contiguous run);
    ``state_dict()`` reflects the batches handed out, not the ones read ahead, so a checkpoint
    taken between steps resumes exactly. An exception in the reader is raised in the consumer.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        sampler: DistributedSampler,
        batch_size: int,
        *,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.prefetch = max(0, prefetch)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return self.sampler.num_batches(self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler state after the batches consumed so far."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state."""
        self.sampler.load_state_dict(state)

    def _read(self, idx: np.ndarray, mask: np.ndarray) -> Batch:
        x, y = self.dataset.read_batch(idx, cached=self.sampler.shuffle == "chunk")
        m = torch.from_numpy(mask.copy())
        if self.pin_memory:
            x, y, m = x.pin_memory(), y.pin_memory(), m.pin_memory()
        return Batch(x, y, m)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.check_batch(self.batch_size)
        plan = list(self.sampler.batches(self.batch_size))
        if self.prefetch == 0:
            for idx, mask in plan:
                batch = self._read(idx, mask)
                self.sampler.advance(len(idx))
                yield batch
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader() -> None:
            try:
                for idx, mask in plan:
                    if stop.is_set():
                        return
                    item = self._read(idx, mask)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                q.put(_DONE)
            except BaseException as exc:  # handed to the consumer, which raises it
                q.put(exc)

        thread = threading.Thread(target=reader, name="mpitrain-prefetch", daemon=True)
        thread.start()
        try:
            for idx, _ in plan:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:  # pragma: no cover - plan and reader agree on length
                    break
                self.sampler.advance(len(idx))
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
