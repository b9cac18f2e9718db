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
from mpitrain.data.tokens import check_identity, token_identity


@dataclass
class Batch:
    """One batch: inputs, labels, a mask that is False for padding samples, and the samples'
    global indices in the dataset (padding repeats a real index; the mask tells)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    index: np.ndarray


_DONE = object()
#: default bytes read per call (a group of consecutive batches): large reads run at the speed
#: of the file system, per-batch Python and HDF5 call overhead is paid once per group
READ_AHEAD_BYTES = 16 << 20


class BatchLoader:
    """Iterate a rank's batches of ``dataset`` in ``sampler`` order.

    Consecutive batches are read together, ``read_ahead_bytes`` at a time (one slice per
    contiguous run on disk), and handed out as views of that read. A daemon thread reads up
    to ``prefetch`` batches ahead (at least one group); ``state_dict()`` reflects the batches
    handed out, not the ones read ahead, so a checkpoint taken between steps resumes exactly.
    An exception in the reader is raised in the consumer.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        sampler: DistributedSampler,
        batch_size: int,
        *,
        prefetch: int = 2,
        pin_memory: bool = False,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.prefetch = max(0, prefetch)
        self.pin_memory = pin_memory
        batch_bytes = max(1, batch_size * dataset.sample_bytes)
        #: batches read by one call
        self.group = max(1, read_ahead_bytes // batch_bytes)
        dataset.preload()  # small datasets: into memory now, not inside the first step

    def __len__(self) -> int:
        return self.sampler.num_batches(self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler state after the batches consumed so far (and, for token data,
        its vocabulary and tokenizer: a resume on other token data is refused)."""
        tokens = token_identity(self.dataset.manifest, self.dataset.directory)
        return {**self.sampler.state_dict(), **({"tokens": tokens} if tokens else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (DataError: it was taken on other token data)."""
        check_identity(state.get("tokens"),
                       token_identity(self.dataset.manifest, self.dataset.directory),
                       self.dataset.directory)
        self.sampler.load_state_dict(state)

    def _read(self, group: list[tuple[np.ndarray, np.ndarray]]) -> list[Batch]:
        """Read consecutive batches with one call; return them as views of that read."""
        idx = np.concatenate([i for i, _ in group]) if len(group) > 1 else group[0][0]
        mask = np.concatenate([m for _, m in group]) if len(group) > 1 else group[0][1].copy()
        # chunk shuffle: small reads (an epoch's first) reuse stored blocks through the LRU;
        # large ones read sorted runs directly, measured faster (docs/benchmarks.md)
        cached = self.sampler.shuffle == "chunk" and len(idx) < 4 * self.dataset.block_samples
        x, y = self.dataset.read_batch(idx, cached=cached)
        m = torch.from_numpy(mask)
        if self.pin_memory:
            x, y, m = x.pin_memory(), y.pin_memory(), m.pin_memory()
        out, start = [], 0
        for i, _ in group:
            end = start + len(i)
            out.append(Batch(x[start:end], y[start:end], m[start:end], i))
            start = end
        return out

    def _groups(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Split the epoch's remaining batches into reads of 1, 2, 4, ... up to ``group``
        batches: the first batch comes quickly, later reads are large."""
        plan = list(self.sampler.batches(self.batch_size))
        out, k, size = [], 0, 1
        while k < len(plan):
            out.append(plan[k : k + size])
            k += size
            size = min(2 * size, self.group)
        return out

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.check_batch(self.batch_size)
        groups = self._groups()
        if self.prefetch == 0 or self.dataset.in_memory:  # in memory: a read is a gather
            for group in groups:
                for batch in self._read(group):
                    self.sampler.advance(len(batch.y))
                    yield batch
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, -(-self.prefetch // self.group)))
        stop = threading.Event()

        def reader() -> None:
            try:
                for group in groups:
                    if stop.is_set():
                        return
                    item = self._read(group)
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
            for _ in groups:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:  # pragma: no cover - plan and reader agree on length
                    break
                for batch in item:
                    self.sampler.advance(len(batch.y))
                    yield batch
        finally:
            stop.set()
            thread.join(timeout=5)
