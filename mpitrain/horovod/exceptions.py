"""Horovod's exceptions (``horovod.common.exceptions``) and the shut-down message."""

from __future__ import annotations


class HorovodInternalError(RuntimeError):
    """A collective failed: ranks disagreed, an op is unsupported here, or Horovod shut down."""


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod elastic's interrupt: the job's hosts were updated (see ``hvd.elastic.run``).

    ``skip_sync`` skips the state broadcast after the reset (Horovod sets it when hosts were
    only removed). ``update`` is the :class:`~mpitrain.horovod.elastic.common.HostUpdateResult`
    that ``State.check_host_updates`` saw (0 when the script raised the interrupt itself).
    """

    def __init__(self, skip_sync: bool = False, update: int = 0) -> None:
        super().__init__(skip_sync)
        self.skip_sync = skip_sync
        self.update = update


class HostsChangedError(RuntimeError):
    """Hosts were added or removed, which an MPI job (a fixed set of processes) cannot follow."""


def shut_down_message(origin: int, me: int, what: str) -> str:
    """Return the error every Horovod call raises once rank ``origin`` has shut down."""
    return (
        f"Horovod has been shut down: rank {origin} called hvd.shutdown() or exited while "
        f"rank {me} was in {what}; every later Horovod call on rank {me} raises this error. "
        "HINT: give every rank the same Horovod calls before hvd.shutdown() (hvd.join() "
        "evens out uneven data)"
    )
