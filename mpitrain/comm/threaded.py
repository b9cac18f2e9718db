"""``ThreadReducer``: any reducer's blocking all-reduces, run on a communication thread.

The gradient engine's hooks call :meth:`ThreadReducer.iallreduce_` when a bucket is ready
during backward; the bucket is queued on the reducer's :class:`CommThread` and reduced there
with the inner stack's own call (its own communicators, used by that thread only):
non-blocking + wait on the thread where the stack overlaps, blocking otherwise, while the
main thread goes on with the backward. ``wait()`` on the handle returns once it is done. The
sums are that stack's, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpitrain.comm.handle import DONE, Handle
from mpitrain.errors import MpitrainError
from mpitrain.runtime.comm_thread import CommThread, check_thread_level

if TYPE_CHECKING:
    import torch

    from mpitrain.comm.reducer import Reducer
    from mpitrain.comm.shards import ShardComm
    from mpitrain.timeline.recorder import Timeline

#: --comm-progress values: thread (this module), poll (non-blocking calls driven by the
#: engine's waits and tests), mpi (non-blocking calls moved by the MPI library's own thread)
PROGRESS_MODES = ("thread", "poll", "mpi")


class _OnThread:
    """A transport whose calls run on its own communication thread (the shared part)."""

    inner: Any

    def __init__(self, rank: int, name: str) -> None:
        check_thread_level()
        self.thread = CommThread(rank, name)

    @property
    def size(self) -> int:
        """Number of ranks the transport spans."""
        return int(self.inner.size)

    def set_timeline(self, recorder: Timeline) -> None:
        """Record each operation's queue wait and run on the thread's own track."""
        self.thread.timeline = recorder


class ThreadReducer(_OnThread):
    """Run ``inner``'s all-reduces in order on one communication thread.

    Args:
        inner: the transport (flat, hierarchical, staged...); only the thread calls it.
        rank: this rank (named in failures).
        name: the stream's name (``gradients``).
    """

    def __init__(self, inner: Reducer, rank: int, name: str = "gradients") -> None:
        super().__init__(rank, name)
        self.inner = inner

    @property
    def overlap(self) -> bool:
        """Always overlapping: the calls run while the main thread computes."""
        return True

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: queue an in-place sum/average of ``t`` on the thread."""
        if self.inner.size == 1 or t.numel() == 0:
            return DONE
        return self.thread.submit(lambda: self.inner.iallreduce_(t, average=average).wait(),
                                  f"allreduce {t.numel() * t.element_size()} B")

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: queue and wait (after everything queued before it)."""
        self.iallreduce_(t, average=average).wait()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self.thread.close()


#: MPI library -> the measured --comm-progress default (docs/engine.md, "Communication thread")
DEFAULT_PROGRESS = {"MPICH": "poll", "Open MPI": "poll"}
#: the env table key of each library's own progress thread switch (--comm-progress mpi)
ASYNC_PROGRESS_ENV = {"MPICH": "mpich_async_progress"}  # Open MPI's ob1/TCP has none


def resolve_progress(choice: str) -> str:
    """``--comm-progress``'s value for this MPI (``auto``: the measured default). Local:
    call it through :func:`mpitrain.runtime.collective.agree` (each rank's environment).

    Raises:
        ConfigError: ``mpi`` without the library's progress thread switched on at launch,
            or ``thread`` without ``MPI_THREAD_MULTIPLE``.
    """
    from mpi4py import MPI

    from mpitrain.errors import ConfigError, with_hint
    from mpitrain.runtime import env

    vendor = MPI.get_vendor()[0]
    if choice == "auto":
        return DEFAULT_PROGRESS.get(vendor, "poll")
    if choice == "mpi":
        key = ASYNC_PROGRESS_ENV.get(vendor)
        if key is None or (env.get(key) or "0") == "0":
            var = env.TABLE[key][0] if key else ""
            raise ConfigError(with_hint(
                f"--comm-progress mpi needs {vendor}'s own progress thread, which this "
                "launch did not start",
                f"launch with {var}=1 in the ranks' environment" if var else
                "use --comm-progress thread or poll with this MPI"))
    if choice == "thread":
        try:
            check_thread_level()
        except MpitrainError as exc:
            raise ConfigError(str(exc)) from None
    return choice


class ThreadShards(_OnThread):
    """Run ``inner``'s reduce-scatters and all-gathers (ZeRO) in order on one thread.

    Args:
        inner: the shard transport (flat, hierarchical, staged...); only the thread calls it.
        rank: this rank (named in failures).
        name: the stream's name (``zero reduce-scatter``, ``zero all-gather``).
    """

    def __init__(self, inner: ShardComm, rank: int, name: str = "zero") -> None:
        super().__init__(rank, name)
        self.inner = inner

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: queue the reduce-scatter of ``send`` on the thread."""
        return self.thread.submit(
            lambda: self.inner.ireduce_scatter_(send, out, average=average).wait(),
            f"reduce-scatter {send.numel() * send.element_size()} B")

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: queue the in-place all-gather of ``full`` on the thread."""
        return self.thread.submit(lambda: self.inner.iallgather_(full).wait(),
                                  f"all-gather {full.numel() * full.element_size()} B")

    def free(self) -> None:
        """Collective: run what is queued, stop the thread, free the inner communicators."""
        self.thread.close()
        self.inner.free()
