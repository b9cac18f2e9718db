"""Agree on Horovod collectives before moving data: errors instead of hangs.

Horovod's coordinator compares each rank's request (operation, name, dtype, shape, op, root
rank, scale factors) and fails them all together when they differ. Here the ranks of a
process set agree in *rounds*: each rank all-gathers one fixed row of int64,

    [status, aux, stamp, count, entry_0 ... entry_{BATCH-1}]

status: ok, locally invalid (``BAD``), joined, or shut down; aux: the round a rank joined at
(joined) or the rank that shut down (a notice); count: how many of this rank's queued
operations the row offers (at most :data:`BATCH`, in submission order); entry: each
operation's identity, its slot in the set's response cache (``CACHED | slot``,
:mod:`mpitrain.horovod.cache`) or else a 62-bit digest of its request. :func:`decide` turns
the rows into the same :class:`Round` on every rank: the first ``min(count)`` operations are
settled in order while every rank offers the same entry; the first that differs (or that some
rank found invalid) goes to the error path, where the full requests are all-gathered
(pickled) and every rank builds the same message from them; whatever a rank offered beyond
that is offered again in the next round. Joined ranks (``hvd.join``) answer with their
status, so the others learn who contributes zeros (one operation per round then).

A rank that shuts down (``hvd.shutdown()``, or the end of its script) posts one last row,
a *notice* (status SHUTDOWN, the Horovod rank that shut down first as aux), on every process
set it belongs to. It matches whatever round each peer makes next on that set, so a peer
blocked in a collective, or calling one later, learns of it and raises instead of waiting
forever. Rounds and notices are non-blocking all-gathers on a communicator used for nothing
else, so a notice never meets a data transfer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from mpi4py import MPI

OK, BAD, JOINED, SHUTDOWN = 0, 1, 2, 3
BATCH = 8  #: operations one round can agree
HEAD = 4  #: status, aux, stamp, count
WIDTH = HEAD + BATCH
CACHED = 1 << 62  #: tag of an entry that is a cache slot (digests keep 62 bits: never tagged)
NONE = -1  #: an unused entry
#: kinds whose first dimension may differ between ranks
VAR_DIM0 = frozenset({"allgather", "grouped_allgather", "alltoall"})
#: kinds that proceed while some ranks have joined (they contribute zeros, or nothing)
JOIN_OK = frozenset({"allreduce", "grouped_allreduce", "barrier"})
_PRETTY = {
    "allreduce": "Allreduce", "grouped_allreduce": "Grouped allreduce",
    "allgather": "Allgather", "grouped_allgather": "Grouped allgather",
    "broadcast": "Broadcast", "alltoall": "Alltoall", "reducescatter": "Reducescatter",
    "grouped_reducescatter": "Grouped reducescatter", "barrier": "Barrier",
}


@dataclass(frozen=True)
class Request:
    """What one rank asks for; ranks must agree on :meth:`fields` (shapes excepted as noted)."""

    kind: str
    name: str | None = None
    dtypes: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    op: str | None = None
    root: int | None = None
    pre: float = 1.0
    post: float = 1.0
    splits: bool = False
    _memo: list[Any] = field(default_factory=list, compare=False, repr=False)

    def agreed_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Return the shape parts ranks must agree on (all but dim 0 for gathers)."""
        if self.kind in VAR_DIM0:
            return tuple((len(s), *s[1:]) for s in self.shapes)
        return self.shapes

    def fields(self) -> tuple[Any, ...]:
        """Return the signature every rank must agree on (the response cache's key)."""
        if not self._memo:
            self._memo.append((self.kind, self.name, self.dtypes, self.agreed_shapes(),
                               self.op, self.root, self.pre, self.post, self.splits))
        sig: tuple[Any, ...] = self._memo[0]
        return sig

    def key(self) -> int:
        """Return a 62-bit digest of :meth:`fields`."""
        sig = self.fields()
        key = _DIGESTS.get(sig)
        if key is None:
            digest = hashlib.blake2b(repr(sig).encode(), digest_size=8).digest()
            key = int.from_bytes(digest, "little") & (CACHED - 1)
            if len(_DIGESTS) >= _DIGESTS_MAX:
                _DIGESTS.clear()
            _DIGESTS[sig] = key
        return key


# a memo of request fields -> digest (training loops repeat the same requests); a pure cache
_DIGESTS: dict[tuple[Any, ...], int] = {}
_DIGESTS_MAX = 4096


class Round(NamedTuple):
    """What a round settled, the same on every rank (:func:`decide`)."""

    shutdown: int | None = None  #: the Horovod rank whose notice ended the set
    consumed: int = 0  #: operations of each active rank's offer settled, in order
    failed: bool = False  #: the last settled operation goes to the error path
    joined: tuple[int, ...] = ()  #: ranks that have joined
    done: bool = False  #: every rank has joined
    entries: tuple[int, ...] = ()  #: the agreed entry of each operation settled without error
    stale: tuple[int, ...] = ()  #: cache slots named by the failed operation's entries


def row(status: int, aux: int, stamp: int, entries: Sequence[int] = ()) -> np.ndarray:
    """Return one rank's row for a round (``entries``: at most :data:`BATCH`)."""
    return np.array([status, aux, stamp, len(entries), *entries,
                     *_UNUSED[:BATCH - len(entries)]], dtype=np.int64)


_UNUSED = (NONE,) * BATCH


class Notice:
    """A posted shut-down row on one set's control communicator (keeps its buffers alive)."""

    __slots__ = ("_bufs", "request")

    def __init__(self, comm: MPI.Intracomm, origin: int) -> None:
        mine = row(SHUTDOWN, origin, -1)
        rows = np.empty((comm.size, WIDTH), dtype=np.int64)
        self._bufs = (mine, rows)
        self.request = comm.Iallgather(mine, rows)

    def everyone(self) -> bool:
        """Return whether every rank of the set posted a notice too (after completion)."""
        return bool((self._bufs[1][:, 0] == SHUTDOWN).all())


def exchange(comm: MPI.Intracomm, mine: np.ndarray) -> np.ndarray:
    """Collective: all-gather every rank's row; returns a (size, WIDTH) array.

    Non-blocking underneath, so that it matches a peer's :class:`Notice`.
    """
    rows = np.empty((comm.size, WIDTH), dtype=np.int64)
    comm.Iallgather(mine, rows).Wait()
    return rows


def shut_down_by(rows: np.ndarray | list[list[int]]) -> int | None:
    """Return the Horovod rank named by a notice among ``rows`` (the lowest), or None."""
    table = rows.tolist() if isinstance(rows, np.ndarray) else rows
    origins = [r[1] for r in table if r[0] == SHUTDOWN]
    return min(origins) if origins else None


def decide(rows: np.ndarray) -> Round:
    """Return what the gathered rows settle (a pure function: the same on every rank)."""
    table: list[list[int]] = rows.tolist()
    first = table[0]
    if first[0] == OK and all(r == first for r in table):  # the steady state: one offer
        return Round(consumed=first[3], entries=tuple(first[HEAD:HEAD + first[3]]))
    origin = shut_down_by(table)
    if origin is not None:
        return Round(shutdown=origin)
    active = [r for r in table if r[0] != JOINED]
    joined = tuple(i for i, r in enumerate(table) if r[0] == JOINED)
    if not active:
        return Round(joined=joined, done=True)
    count = 1 if joined else min(r[3] for r in active)
    bad = any(r[0] == BAD for r in active)
    first = active[0]
    for j in range(HEAD, HEAD + count):
        entry = first[j]
        if (bad and j == HEAD) or any(r[j] != entry for r in active):
            stale = tuple(sorted({r[j] - CACHED for r in active if r[j] >= CACHED}))
            return Round(consumed=j - HEAD + 1, failed=True, joined=joined,
                         entries=tuple(first[HEAD:j]), stale=stale)
    return Round(consumed=count, joined=joined, entries=tuple(first[HEAD:HEAD + count]))


def explain(comm: MPI.Intracomm, req: Request | None, local_error: str | None) -> str:
    """Collective: all-gather the failed operation's requests; return the agreed message.

    Joined ranks take part with ``req=None``.
    """
    gathered: list[tuple[Request | None, str | None]] = comm.allgather((req, local_error))
    return describe(gathered)


def joined_request(comm: MPI.Intracomm, rows: np.ndarray, entry: int, req: Request | None,
                   cached: Callable[[int], Request | None]) -> tuple[Request, str | None]:
    """Collective: the active ranks' request in a round with joined ranks, and its error.

    A cached entry is looked up in every rank's (identical) cache; otherwise the first
    active rank broadcasts its request. Returns (request, error or None).
    """
    agreed = cached(entry - CACHED) if entry >= CACHED else None
    if agreed is None:
        first = next(r for r in range(len(rows)) if rows[r, 0] != JOINED)
        agreed = comm.bcast(req if comm.rank == first else None, root=first)
    assert agreed is not None
    if agreed.kind in JOIN_OK:
        return agreed, None
    joined = [r for r in range(len(rows)) if rows[r, 0] == JOINED]
    pretty = _PRETTY.get(agreed.kind, agreed.kind)
    return agreed, (f"{pretty} is not supported with Join at this time "
                    f"(ranks {joined} have joined)")


def _diff(label: str, values: dict[int, Any]) -> str | None:
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) < 2:
        return None
    parts = []
    for v in distinct:
        ranks = [r for r, x in values.items() if x == v]
        parts.append(f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}: {v}")
    return f"Mismatched {label}: " + "; ".join(parts)


def describe(gathered: list[tuple[Request | None, str | None]]) -> str:
    """Return the one message every rank raises for a failed negotiation."""
    for r, (_req, err) in enumerate(gathered):
        if err is not None:
            return f"rank {r}: {err}"
    reqs = {r: q for r, (q, _e) in enumerate(gathered) if q is not None}
    any_req = next(iter(reqs.values()))
    pretty = _PRETTY.get(any_req.kind, any_req.kind)

    def shapes(q: Request) -> str:
        if q.kind in VAR_DIM0:  # the first dimension may differ: show it as *
            return ", ".join(str(["*", *s[1:]]).replace("'", "") for s in q.shapes)
        return ", ".join(str(list(s)) for s in q.shapes)

    checks: list[tuple[str, dict[int, Any]]] = [
        ("Horovod operations", {r: q.kind for r, q in reqs.items()}),
        ("tensor names", {r: q.name for r, q in reqs.items()}),
        ("number of tensors", {r: len(q.shapes) for r, q in reqs.items()}),
        ("data types", {r: ", ".join(q.dtypes) for r, q in reqs.items()}),
        (f"{pretty.lower()} tensor ranks (dimensions)",
         {r: [len(s) for s in q.shapes] for r, q in reqs.items()}),
        (f"{pretty.lower()} tensor shapes" + (" beyond the first dimension"
                                              if any_req.kind in VAR_DIM0 else ""),
         {r: shapes(q) for r, q in reqs.items()}),
        ("reduction ops", {r: q.op for r, q in reqs.items()}),
        (f"{pretty.lower()} root ranks", {r: q.root for r, q in reqs.items()}),
        ("prescale factors", {r: q.pre for r, q in reqs.items()}),
        ("postscale factors", {r: q.post for r, q in reqs.items()}),
        ("alltoall splits (given or not)", {r: q.splits for r, q in reqs.items()}),
    ]
    for label, values in checks:
        msg = _diff(label, {r: str(v) for r, v in values.items()})
        if msg is not None:
            return f"{pretty} '{any_req.name or 'noname'}': {msg}"
    return f"{pretty}: ranks disagree on the request"
