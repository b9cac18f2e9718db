"""Agree on every Horovod collective before moving data: errors instead of hangs.

Horovod's coordinator compares each rank's request (operation, name, dtype, shape, op, root
rank, scale factors) and fails them all together when they differ. Here each call first
all-gathers three int64 per rank: a status (ok, locally invalid, joined), a 64-bit digest of
the request and a round number. When every rank is ok with the same digest the data moves;
otherwise the full requests are all-gathered (pickled; the error path only) and every rank
builds the same message from them. Joined ranks (``hvd.join``) answer with their status so
the others learn who contributes zeros.

A rank that shuts down (``hvd.shutdown()``, or the end of its script) posts one last row,
a *notice* (status SHUTDOWN, the Horovod rank that shut down first in place of the digest),
on every process set it belongs to. It matches whatever exchange each peer makes next on that
set, so a peer blocked in a collective, or calling one later, learns of it and raises
instead of waiting forever. Exchanges and notices are non-blocking all-gathers on a
communicator used for nothing else, so a notice never meets a data transfer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpi4py import MPI

OK, BAD, JOINED, SHUTDOWN = 0, 1, 2, 3
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
    """What one rank asks for; ranks must agree on :meth:`key` (shapes excepted as noted)."""

    kind: str
    name: str | None = None
    dtypes: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    op: str | None = None
    root: int | None = None
    pre: float = 1.0
    post: float = 1.0
    splits: bool = False
    _key: list[int] = field(default_factory=list, compare=False, repr=False)

    def agreed_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Return the shape parts ranks must agree on (all but dim 0 for gathers)."""
        if self.kind in VAR_DIM0:
            return tuple((len(s), *s[1:]) for s in self.shapes)
        return self.shapes

    def key(self) -> int:
        """Return a 64-bit digest of the fields every rank must agree on."""
        if not self._key:
            fields = (self.kind, self.name, self.dtypes, self.agreed_shapes(), self.op,
                      self.root, self.pre, self.post, self.splits)
            key = _DIGESTS.get(fields)
            if key is None:
                digest = hashlib.blake2b(repr(fields).encode(), digest_size=8).digest()
                key = int.from_bytes(digest, "little", signed=True)
                if len(_DIGESTS) >= _DIGESTS_MAX:
                    _DIGESTS.clear()
                _DIGESTS[fields] = key
            self._key.append(key)
        return self._key[0]


# a memo of request fields -> digest (training loops repeat the same requests); a pure cache
_DIGESTS: dict[tuple[Any, ...], int] = {}
_DIGESTS_MAX = 4096


@dataclass(frozen=True)
class Outcome:
    """The agreed result of a negotiation."""

    error: str | None = None
    joined: tuple[int, ...] = ()
    request: Request | None = None  # the active ranks' request (what joined ranks mirror)
    shutdown: int | None = None  # the Horovod rank whose shutdown ended this set


class Notice:
    """A posted shut-down row on one set's control communicator (keeps its buffers alive)."""

    __slots__ = ("_bufs", "request")

    def __init__(self, comm: MPI.Intracomm, origin: int) -> None:
        row = np.array([SHUTDOWN, origin, -1], dtype=np.int64)
        rows = np.empty((comm.size, 3), dtype=np.int64)
        self._bufs = (row, rows)
        self.request = comm.Iallgather(row, rows)

    def everyone(self) -> bool:
        """Return whether every rank of the set posted a notice too (after completion)."""
        return bool((self._bufs[1][:, 0] == SHUTDOWN).all())


def exchange(comm: MPI.Intracomm, status: int, key: int, stamp: int) -> np.ndarray:
    """Collective: all-gather (status, key, stamp) from every rank; returns a (size, 3) array.

    Non-blocking underneath, so that it matches a peer's :class:`Notice`.
    """
    row = np.array([status, key, stamp], dtype=np.int64)
    rows = np.empty((comm.size, 3), dtype=np.int64)
    comm.Iallgather(row, rows).Wait()
    return rows


def shut_down_by(rows: np.ndarray) -> int | None:
    """Return the Horovod rank named by a notice among ``rows`` (the lowest), or None."""
    origins = [int(rows[r, 1]) for r in range(len(rows)) if rows[r, 0] == SHUTDOWN]
    return min(origins) if origins else None


def _active(rows: np.ndarray) -> list[int]:
    return [r for r in range(len(rows)) if rows[r, 0] != JOINED]


def disagree(rows: np.ndarray) -> bool:
    """Return whether the rows call for the error path (a bad rank or differing keys)."""
    active = _active(rows)
    return bool((rows[:, 0] == BAD).any()) or len({int(rows[r, 1]) for r in active}) > 1


def resolve(comm: MPI.Intracomm, rows: np.ndarray, req: Request | None,
            local_error: str | None) -> Outcome:
    """Collective: turn gathered rows into an Outcome, the same on every rank.

    Joined ranks call this with ``req=None`` (they mirror the active ranks' request). A
    notice among the rows ends the set for everyone (no further collective on ``comm``).
    """
    origin = shut_down_by(rows)
    if origin is not None:
        return Outcome(shutdown=origin)
    if disagree(rows):
        gathered: list[tuple[Request | None, str | None]] = comm.allgather((req, local_error))
        return Outcome(error=describe(gathered))
    joined = tuple(r for r in range(len(rows)) if rows[r, 0] == JOINED)
    if not joined:
        return Outcome(request=req)
    first = _active(rows)[0]
    agreed: Request = comm.bcast(req if comm.rank == first else None, root=first)
    if agreed.kind not in JOIN_OK:
        pretty = _PRETTY.get(agreed.kind, agreed.kind)
        return Outcome(error=f"{pretty} is not supported with Join at this time "
                             f"(ranks {list(joined)} have joined)", joined=joined,
                       request=agreed)
    return Outcome(joined=joined, request=agreed)


def negotiate(comm: MPI.Intracomm, stamp: int, req: Request,
              local_error: str | None = None) -> Outcome:
    """Collective: agree on ``req`` with every rank of ``comm``; see the module docstring."""
    key = req.key()
    rows = exchange(comm, BAD if local_error else OK, key, stamp)
    if local_error is None and all(s == OK and k == key for s, k, _ in rows.tolist()):
        return Outcome(request=req)  # the fast path: everyone asked for the same
    return resolve(comm, rows, req, local_error)


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
