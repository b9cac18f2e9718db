"""Horovod's process-global state, held in one :class:`Context` made by ``hvd.init()``.

Horovod's API has no communicator argument (``hvd.rank()``, ``hvd.allreduce(t)``), so one
context per process is unavoidable. Everything lives in it: the world, the registered
process sets (each with its response cache), the engine that agrees and runs the collectives
(:mod:`mpitrain.horovod.engine`, with its communication thread), the table from integer
handles to operations (Horovod's ``synchronize`` takes an ``int``), the names in flight and
the join state. ``shutdown()`` drops it all.

Ending unevenly: ``init()`` makes an uncaught exception on any rank abort the whole job
(mpitrain's excepthook: ``rank R/N on HOST`` and the traceback, then ``MPI_Abort``), and
``shutdown()``, which also runs at interpreter exit, posts a notice on every process set
(:mod:`mpitrain.horovod.negotiate`): peers that are in, or later enter, a collective raise
Horovod's "Horovod has been shut down" error instead of waiting for a rank that has gone.
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from mpitrain.comm.handle import DONE
from mpitrain.horovod.cache import DEFAULT_CAPACITY
from mpitrain.horovod.engine import WAIT, Engine, SetState
from mpitrain.horovod.exceptions import HorovodInternalError, shut_down_message
from mpitrain.horovod.negotiate import Notice, Request
from mpitrain.runtime.abort import install_excepthook
from mpitrain.timeline import NULL, Timeline, TraceSession

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.horovod.handles import Op
    from mpitrain.runtime.world import World


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
        self._ctl: MPI.Intracomm | None = None  # its duplicate for agreements and notices
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
        """Collective over ``comm``: adopt it (and a duplicate for the agreements)."""
        self.process_set_id, self.ranks, self._comm = set_id, ranks, comm
        self._rank = None if comm is None else comm.rank
        self._ctl = None if comm is None else comm.Dup()

    def _detach(self) -> None:
        if self._comm is not None and self.process_set_id != 0:
            self._comm.Free()
        if self._ctl is not None:
            self._ctl.Free()
        self.process_set_id, self._comm, self._ctl, self._rank = None, None, None, None


global_process_set = ProcessSet([])  # every rank; attached by init()


@dataclass(eq=False)
class Context:
    """Everything ``hvd.init()`` creates; see the module docstring."""

    world: World
    engine: Engine = field(init=False)
    sets: dict[int, ProcessSet] = field(default_factory=dict)
    states: dict[int, SetState] = field(default_factory=dict)
    handles: dict[int, Op] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    next_handle: int = 0
    next_set: int = 1
    timeline: Timeline = NULL  # hvd.start_timeline's recorder
    trace: TraceSession | None = None
    engines: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    init_comm: Any = None  # init()'s argument, for hvd.elastic's reset
    down: int | None = None  # the Horovod rank whose shutdown ended Horovod here
    closed: set[int] = field(default_factory=set)  # sets with no more agreements
    notices: list[Notice] = field(default_factory=list)
    hooks: tuple[Any, ...] = ()  # the excepthooks init() replaced, then its own

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

    def control_of(self, ps: ProcessSet | None) -> MPI.Intracomm:
        """Return the communicator the agreements of a set (already checked) run on."""
        ctl = (global_process_set if ps is None else ps)._ctl
        assert ctl is not None
        return ctl

    def raise_if_down(self, what: str) -> None:
        """Raise Horovod's shut-down error once some rank has shut down (and progress notices)."""
        if self.down is None:
            return
        from mpi4py import MPI

        MPI.Request.Testall([n.request for n in self.notices])
        raise HorovodInternalError(shut_down_message(self.down, self.world.rank, what))

    def learn(self, ps: ProcessSet | None, origin: int, what: str) -> HorovodInternalError:
        """Record that ``origin`` shut down (seen on ``ps`` while in ``what``); pass the notice
        on to every other set this rank belongs to, so peers waiting there raise too.

        Returns the error to raise.
        """
        self.closed.add(cast(int, (global_process_set if ps is None else ps).process_set_id))
        if self.down is None:
            self.down = origin
            self.announce(origin)
        return HorovodInternalError(shut_down_message(self.down, self.world.rank, what))

    def announce(self, origin: int) -> None:
        """Post this rank's last row, a notice naming ``origin``, on every open set it is in."""
        for sid, ps in sorted(self.sets.items()):
            if sid not in self.closed and ps._ctl is not None:
                self.notices.append(Notice(ps._ctl, origin))
                self.closed.add(sid)

    def agree(self, what: str, ps: ProcessSet | None = None) -> None:
        """Collective over ``ps``: agree before a step that communicates outside the agreements
        (registering a set, a timeline, an optimizer's layout check); raises like a collective.
        """
        self.engine.submit(ps, Request(what), _nothing, call=WAIT).result()

    def state_of(self, ps: ProcessSet) -> SetState:
        """Return the bookkeeping of a registered set."""
        return self.states[cast(int, ps.process_set_id)]

    def register(self, ps: ProcessSet) -> None:
        """Collective over the world: create ``ps``'s sub-communicator and give it an id."""
        from mpi4py import MPI

        self.engine.drain()  # the world's communicator is the global set's: the thread's
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
        self.states[set_id] = self.engine.new_state()


def _nothing(comm: MPI.Intracomm, outcome: Any) -> tuple[Any, Any]:
    """The data movement of an agreement alone (a barrier, a step that communicates)."""
    return DONE, lambda: None


_ctx: Context | None = None
_exit_hook: list[bool] = []  # shutdown() is registered with atexit once per process


def context() -> Context:
    """Return the context made by ``hvd.init()``; raise Horovod's error before it."""
    if _ctx is None:
        raise _not_initialized()
    return _ctx


def current() -> Context | None:
    """Return the context or None (no error)."""
    return _ctx


def init(comm: Any = None, process_sets: Iterable[ProcessSet] | str | None = None, *,
         progress: str = "auto", cache_capacity: int = DEFAULT_CAPACITY) -> None:
    """Collective: initialize over ``comm`` (an mpi4py communicator, a list of COMM_WORLD
    ranks, or None for COMM_WORLD) and register ``process_sets``.

    ``process_sets="dynamic"`` is accepted (sets can always be added later). Beyond
    Horovod's arguments: ``progress`` (``thread``: collectives agreed and run on a
    communication thread, ``*_async`` returning at once; ``poll``: agreed at the call;
    ``auto``: thread where MPI gives ``MPI_THREAD_MULTIPLE``) and ``cache_capacity`` (the
    response cache's size per process set, Horovod's ``HOROVOD_CACHE_CAPACITY``; 0: off).
    """
    global _ctx
    from mpi4py import MPI

    from mpitrain.runtime.world import World

    if _ctx is not None:
        return
    init_comm = comm
    if comm is None:
        comm = MPI.COMM_WORLD
    elif isinstance(comm, list | tuple):
        group = MPI.COMM_WORLD.group.Incl([int(r) for r in comm])
        comm = MPI.COMM_WORLD.Create_group(group)  # collective over the listed ranks only
        group.Free()
    ctx = Context(World.create(comm), init_comm=init_comm)
    ctx.engine = Engine(ctx, progress, cache_capacity)
    global_process_set._attach(0, list(range(ctx.world.size)), ctx.world.comm)
    ctx.sets[0] = global_process_set
    ctx.states[0] = ctx.engine.new_state()
    before = (sys.excepthook, threading.excepthook)
    install_excepthook(ctx.world.comm)
    ctx.hooks = (*before, sys.excepthook, threading.excepthook)
    if not _exit_hook:
        atexit.register(_shutdown_at_exit)
        _exit_hook.append(True)
    _ctx = ctx
    if process_sets is not None and not isinstance(process_sets, str):
        for ps in process_sets:
            ctx.register(ps)


def shutdown() -> None:
    """Collective: end Horovod on this rank; peers' pending and later calls raise.

    Waits for this rank's operations in flight (and the engine's queue), stops the
    communication thread, posts a notice on every process set (so peers
    blocked in a collective, or entering one later, raise Horovod's shut-down error) and waits
    until each peer has seen it, then frees the communicators and restores the excepthooks.
    """
    global _ctx
    from mpi4py import MPI

    ctx = _ctx
    if ctx is None:
        return
    _ctx = None
    try:
        for op in list(ctx.handles.values()):
            try:
                op.wait()  # agreed by every rank, so it completes
            except Exception:  # the caller never synchronized it: its error is moot now
                continue
        try:  # what the engine still has queued (e.g. buckets never synchronized)
            ctx.engine.drain()
        except Exception:  # the thread failed: reported through its handles (or it aborts)
            pass
        ctx.engine.close()
        ctx.announce(ctx.world.rank if ctx.down is None else ctx.down)
        MPI.Request.Waitall([n.request for n in ctx.notices])
        together = ctx.down is None and all(n.everyone() for n in ctx.notices)
        if ctx.trace is not None and together:
            ctx.trace.stop()  # collective: every rank is here
        elif ctx.trace is not None:
            sys.stderr.write(f"hvd.shutdown: rank {ctx.world.rank}: timeline not written "
                             "(the ranks did not shut down together)\n")
    finally:
        for ps in list(ctx.sets.values()):
            ps._detach()
        ctx.world.free()
        if ctx.hooks:  # put back what init() replaced, unless the script changed it since
            old_sys, old_thread, ours_sys, ours_thread = ctx.hooks
            if sys.excepthook is ours_sys:
                sys.excepthook = old_sys
            if threading.excepthook is ours_thread:
                threading.excepthook = old_thread


def _shutdown_at_exit() -> None:
    from mpi4py import MPI

    if _ctx is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        shutdown()


def configure(progress: str | None = None, cache_capacity: int | None = None) -> None:
    """Change the engine's ``progress`` mode and/or the response caches' capacity (not
    Horovod API; ``hvd.init`` takes the same keywords).

    Waits for what is queued first. Changing the capacity empties every cache, so call it
    on every rank at the same point of the program (between the same two collectives), as
    a collective; a rank that does not only makes the next calls fail their agreement.
    """
    context().engine.configure(progress, cache_capacity)


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Collective (every rank): register a new process set; returns it."""
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    ctx = context()
    ctx.agree("hvd.add_process_set")
    ctx.register(ps)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Collective (every rank): unregister ``process_set``; returns whether it was removed."""
    ctx = context()
    sid = process_set.process_set_id
    if sid is None or sid == 0 or ctx.sets.get(sid) is not process_set:
        return False
    ctx.agree("hvd.remove_process_set")  # every rank removes it together
    del ctx.sets[sid]
    del ctx.states[sid]
    process_set._detach()
    return True
