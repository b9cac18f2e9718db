"""The response cache: signatures every rank of a process set has agreed on (Horovod's
``response_cache.cc``), with the same contents on every rank.

A signature (kind, name, dtypes, shapes, op, root, scale factors, splits; the process set is
the cache's owner) enters the cache once a round settled it without error and with no rank
joined; every rank sees the same rounds in the same order, so every rank inserts the same
signature under the same slot number and evicts the same least recently agreed one when
full. Later calls with that signature are offered in a round by their slot
(``CACHED | slot``) instead of their digest, and a joined rank reads the request from its own
copy instead of receiving it. A signature that differs on one rank shows as a different
entry: the error path runs as for any mismatch, and every rank evicts the slots the failed
operation named (:attr:`~mpitrain.horovod.negotiate.Round.stale`).

A hit is still agreed: a rank cannot know that its peers call the same thing without a word
from each of them (one calling something else would be left in a mismatched collective).
What takes the agreement off the critical path is the communication thread
(:mod:`mpitrain.horovod.engine`), which agrees up to ``BATCH`` queued operations per round.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mpitrain.horovod.negotiate import CACHED, Request

#: Horovod's default HOROVOD_CACHE_CAPACITY
DEFAULT_CAPACITY = 1024


class ResponseCache:
    """Agreed signatures -> slot numbers, least recently agreed first (see module docstring).

    Args:
        capacity: the most signatures kept (0: no cache; every call offers its digest).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._slots: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._requests: dict[int, Request] = {}
        self._next = 0
        self.hits = 0  #: operations settled by their slot
        self.misses = 0  #: operations settled by their digest (then inserted)

    def __len__(self) -> int:
        return len(self._slots)

    def entry(self, req: Request) -> int:
        """Return what ``req`` is offered as: ``CACHED | slot`` when cached, else its digest."""
        slot = self._slots.get(req.fields())
        return req.key() if slot is None else CACHED | slot

    def request(self, slot: int) -> Request | None:
        """Return the request cached under ``slot`` (None: not cached)."""
        return self._requests.get(slot)

    def agreed(self, req: Request, entry: int) -> None:
        """Record that every rank settled ``req`` (offered as ``entry``) without error."""
        if entry >= CACHED:
            self.hits += 1
        else:
            self.misses += 1
        sig = req.fields()
        if sig in self._slots:  # (a hit, or a miss inserted earlier in the same round)
            self._slots.move_to_end(sig)
            return
        if self.capacity == 0:  # (or a hit evicted earlier in the same round: re-inserted)
            return
        if len(self._slots) >= self.capacity:
            _, old = self._slots.popitem(last=False)
            del self._requests[old]
        self._slots[sig] = self._next
        self._requests[self._next] = req
        self._next += 1

    def evict(self, slots: tuple[int, ...]) -> None:
        """Forget ``slots`` (a signature that differed on some rank)."""
        for slot in slots:
            req = self._requests.pop(slot, None)
            if req is not None:
                del self._slots[req.fields()]

    def clear(self) -> None:
        """Forget every signature (slot numbers are not reused)."""
        self._slots.clear()
        self._requests.clear()

    def signatures(self) -> list[tuple[int, tuple[Any, ...]]]:
        """Return (slot, signature) pairs, least recently agreed first (for checks)."""
        return [(slot, sig) for sig, slot in self._slots.items()]
