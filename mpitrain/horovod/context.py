"""Horovod's process-global state, held in one :class:`Context` made by ``hvd.init()``.

Horovod's API has no communicator argument (``hvd.rank()``, ``hvd.allreduce(t)``), so one
context per process is unavoidable. Everything lives in it: the world, the registered
process sets, the table from integer handles to operations (Horovod's ``synchronize`` takes
an ``int``), the names in flight and the join state. ``shutdown()`` drops it all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from mpitrain.timeline import NULL, Timeline, TraceSession

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.horovod.handles import Op
    from mpitrain.runtime.world import World


class HorovodInternalError(RuntimeError):
    """A collective failed (ranks disagreed, or an op is unsupported in this state)."""


def _not_initialized() -> ValueError:
    return ValueError("Horovod has not been initialized; use hvd.init().")


class ProcessSet:
    """A subset of ranks that collectives can be limited to (``process_set=``).

    Build with a list of global ranks (or an mpi4py communicator whose ranks form the set),
    then register it with ``hvd.init(process_sets=[...])`` or ``hvd.add_process_set``.
    """

    def __init__(self, ranks_or_comm: Sequence[int] | Any) -> None:
        self.process_set_id: int | None = None
        self.mpi_comm: Any = None
        if isinstance(ranks_or_comm, Sequence):
            self.ranks: list[int] | None = sorted({int(r) for r in ranks_or_comm})
        else:  # an mpi4py communicator: ranks resolved when registered
            self.ranks = None
            self.mpi_comm = ranks_or_comm
        self._comm: MPI.Intracomm | None = None  # this rank's sub-communicator, if included
        self._rank: int | None = None

    def size(self) -> int | None:
        """Return the number of ranks in the set (None until registered)."""
        return None if self.process_set_id is None or self.ranks is None else len(self.ranks)

    def rank(self) -> int | None:
        """Return this process's rank within the set (None if not registered or not in it)."""
        return self._rank if self.process_set_id is not None else None

    def included(self) -> bool | None:
        """Return whether this process is in the set (None until registered)."""
        return None if self.process_set_id is None else self._comm is not None

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"

    def _attach(self, set_id: int, ranks: list[int], comm: MPI.Intracomm | None) -> None:
        self.process_set_id, self.ranks, self._comm = set_id, ranks, comm
        self._rank = None if comm is None else comm.rank

    def _detach(self) -> None:
        if self._comm is not None and self.process_set_id != 0:
            self._comm.Free()
        self.process_set_id, self._comm, self._rank = None, None, None


global_process_set = ProcessSet([])  # every rank; attached by init()


@dataclass(eq=False)
class SetState:
    """Per-process-set bookkeeping: negotiation rounds (the join order needs them)."""

    rounds: int = 0


@dataclass(eq=False)
class Context:
    """Everything ``hvd.init()`` creates; see the module docstring."""

    world: World
    sets: dict[int, ProcessSet] = field(default_factory=dict)
    states: dict[int, SetState] = field(default_factory=dict)
    handles: dict[int, Op] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    next_handle: int = 0
    next_set: int = 1
    timeline: Timeline = NULL  # hvd.start_timeline's recorder
    trace: TraceSession | None = None
    engines: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)

    def comm_of(self, ps: ProcessSet | None, what: str = "this operation") -> MPI.Intracomm:
        """Return this rank's communicator of ``ps``; raise Horovod's error if not a member."""
        ps = global_process_set if ps is None else ps
        if not isinstance(ps, ProcessSet):
            raise TypeError(f"process_set must be an hvd.ProcessSet, got {type(ps).__name__}")
        if ps.process_set_id is None or self.sets.get(ps.process_set_id) is not ps:
            raise ValueError(
                f"{what}: process set {ps.ranks} is not registered; pass it to "
                "hvd.init(process_sets=[...]) or hvd.add_process_set() first"
            )
        if ps._comm is None:
            raise ValueError(
                f"{what}: Rank {self.world.rank} is not a member of the provided process set "
                f"(ranks {ps.ranks})"
            )
        return ps._comm

    def state_of(self, ps: ProcessSet) -> SetState:
        """Return the bookkeeping of a registered set."""
        return self.states[cast(int, ps.process_set_id)]

    def register(self, ps: ProcessSet) -> None:
        """Collective over the world: create ``ps``'s sub-communicator and give it an id."""
        from mpi4py import MPI

        comm = self.world.comm
        if ps.ranks is None:  # built from a communicator: its members' world ranks
            sub = ps.mpi_comm
            mine = comm.rank if sub is not None and sub != MPI.COMM_NULL else None
            ranks_all = comm.allgather(mine)
            ps.ranks = sorted(r for r in ranks_all if r is not None)
        ranks = list(ps.ranks)
        everyone = comm.allgather(ranks)
        if any(r != ranks for r in everyone):
            raise ValueError(f"add_process_set: ranks disagree on the set's members: {everyone}")
        bad = [r for r in ranks if not 0 <= r < comm.size]
        if bad or not ranks:
            raise ValueError(f"process set ranks {ranks} must be non-empty and in [0, {comm.size})")
        for other in self.sets.values():
            if other.ranks == ranks and other is not global_process_set:
                raise ValueError(f"a process set with ranks {ranks} is already registered")
        if ps.process_set_id is not None:
            raise ValueError(f"{ps!r} is already registered")
        color = 0 if comm.rank in ranks else MPI.UNDEFINED
        sub = comm.Split(color, comm.rank)
        set_id = self.next_set
        self.next_set += 1
        ps._attach(set_id, ranks, None if sub == MPI.COMM_NULL else cast("MPI.Intracomm", sub))
        self.sets[set_id] = ps
        self.states[set_id] = SetState()


_ctx: Context | None = None


def context() -> Context:
    """Return the context made by ``hvd.init()``; raise Horovod's error before it."""
    if _ctx is None:
        raise _not_initialized()
    return _ctx


def current() -> Context | None:
    """Return the context or None (no error)."""
    return _ctx


def init(comm: Any = None, process_sets: Iterable[ProcessSet] | str | None = None) -> None:
    """Collective: initialize over ``comm`` (an mpi4py communicator, a list of COMM_WORLD
    ranks, or None for COMM_WORLD) and register ``process_sets``.

    ``process_sets="dynamic"`` is accepted (sets can always be added later).
    """
    global _ctx
    from mpi4py import MPI

    from mpitrain.runtime.world import World

    if _ctx is not None:
        return
    if comm is None:
        comm = MPI.COMM_WORLD
    elif isinstance(comm, list | tuple):
        group = MPI.COMM_WORLD.group.Incl([int(r) for r in comm])
        comm = MPI.COMM_WORLD.Create_group(group)  # collective over the listed ranks only
        group.Free()
    ctx = Context(World.create(comm))
    global_process_set._attach(0, list(range(ctx.world.size)), ctx.world.comm)
    ctx.sets[0] = global_process_set
    ctx.states[0] = SetState()
    _ctx = ctx
    if process_sets is not None and not isinstance(process_sets, str):
        for ps in process_sets:
            ctx.register(ps)


def shutdown() -> None:
    """Collective: free the process sets and communicators made by :func:`init`."""
    global _ctx
    ctx = _ctx
    if ctx is None:
        return
    _ctx = None
    if ctx.trace is not None:
        ctx.trace.stop()
    for ps in list(ctx.sets.values()):
        ps._detach()
    ctx.world.free()


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Collective (every rank): register a new process set; returns it."""
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    context().register(ps)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Collective (every rank): unregister ``process_set``; returns whether it was removed."""
    ctx = context()
    sid = process_set.process_set_id
    if sid is None or sid == 0 or ctx.sets.get(sid) is not process_set:
        return False
    ctx.world.comm.Barrier()  # every rank removes it together
    del ctx.sets[sid]
    del ctx.states[sid]
    process_set._detach()
    return True
