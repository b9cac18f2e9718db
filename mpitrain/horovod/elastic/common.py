"""Horovod's elastic state and retry loop (``horovod.common.elastic``) on a fixed MPI world.

A :class:`State` is saved in host memory by ``commit()`` (which also checks for host
updates), put back by ``restore()`` and made equal on every rank by ``sync()`` (broadcasts
from rank 0). :func:`run_fn` calls the training function after a ``sync()``.

Horovod's driver adds and removes hosts while the job runs and tells the workers through
``State.on_hosts_updated``. An MPI job keeps the processes it was started with, and nothing
here calls ``on_hosts_updated`` (there is no driver), so a job whose hosts never change runs
as an ordinary job: ``commit()`` saves and agrees that nothing changed. What differs from
Horovod, each because an MPI world cannot be re-formed while it runs:

- a ``HostsUpdatedInterrupt`` that reports hosts really added or removed (an ``update`` from
  ``on_hosts_updated``) raises :class:`~mpitrain.horovod.exceptions.HostsChangedError`;
  one without a change (the script raised it itself) resets and retries, as in Horovod;
- a ``HorovodInternalError`` (ranks disagreed, or a rank shut down) restores the last commit
  and is raised again instead of resetting: the world cannot drop the rank that failed.
"""

from __future__ import annotations

import functools
import queue
from collections.abc import Callable
from enum import IntFlag
from typing import Any

from mpitrain.horovod.exceptions import (
    HorovodInternalError,
    HostsChangedError,
    HostsUpdatedInterrupt,
)


class HostUpdateResult(IntFlag):
    """What a host update did (Horovod's ``horovod.runner.elastic.worker.HostUpdateResult``)."""

    no_update = 0
    removed = 1
    added = 2
    mixed = removed | added


class State:
    """Training state that can be saved, restored and made equal on every rank.

    Args:
        bcast_object: broadcasts a picklable object from rank 0 (``hvd.broadcast_object``).
        get_rank: returns this process's rank (``hvd.rank``).
    """

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int]) -> None:
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._host_messages: queue.Queue[tuple[int, int]] = queue.Queue()
        self._last_updated_timestamp = 0
        self._reset_callbacks: list[Callable[[], Any]] = []

    def register_reset_callbacks(self, callbacks: list[Callable[[], Any]]) -> None:
        """Call ``callbacks`` after every reset (e.g. to rescale the learning rate)."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Forget queued host updates, :meth:`reset`, then run the reset callbacks."""
        self._host_messages = queue.Queue()
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: int, update_res: int) -> None:
        """Queue a host update (Horovod's driver calls this; nothing in mpitrain does)."""
        self._host_messages.put((timestamp, int(update_res)))

    def commit(self) -> None:
        """Collective: :meth:`save`, then :meth:`check_host_updates`."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Collective: raise ``HostsUpdatedInterrupt`` on every rank if rank 0 has seen a newer
        host update than the last one acted on (one broadcast from rank 0).
        """
        prev = last = self._last_updated_timestamp
        update = HostUpdateResult.no_update
        while not self._host_messages.empty():
            timestamp, res = self._host_messages.get()
            if timestamp > last:
                last = timestamp
                update |= HostUpdateResult(res)
        prev, last, agreed = self._bcast_object((prev, last, int(update)))
        self._last_updated_timestamp = last
        if last > prev:
            raise HostsUpdatedInterrupt(agreed == HostUpdateResult.removed, update=agreed)

    def save(self) -> None:
        """Save the state in host memory."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put back the last saved state, undoing what changed since."""
        raise NotImplementedError

    def sync(self) -> None:
        """Collective: make the state equal on every rank (rank 0's)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Adjust to a reset (before the next sync); nothing by default."""


class ObjectState(State):
    """State of plain picklable objects, given as keyword arguments and kept as attributes."""

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int],
                 **kwargs: Any) -> None:
        self._bcast_object = bcast_object
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

    def save(self) -> None:
        """Save the current value of every attribute given at construction."""
        self._saved_state = {name: getattr(self, name) for name in self._saved_state}

    def restore(self) -> None:
        """Put back the saved values."""
        self._set_attrs()

    def sync(self) -> None:
        """Collective: take rank 0's saved values."""
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, value)


_CHANGES = {1: "removed", 2: "added", 3: "added and removed"}


def run_fn(func: Callable[..., Any], reset: Callable[[], None]) -> Callable[..., Any]:
    """Wrap ``func(state, ...)``: sync the state, call it; see the module docstring.

    ``reset`` ends and restarts Horovod on the same ranks (every rank calls it together).
    """

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except HorovodInternalError as exc:
                state.restore()
                exc.add_note(
                    "hvd.elastic.run: the state was restored to the last commit; an MPI job "
                    "cannot drop a failed rank and go on. HINT: to survive failures, save "
                    "checkpoints and requeue the job (docs/migrating-from-horovod.md)"
                )
                raise
            except HostsUpdatedInterrupt as exc:
                if exc.update != HostUpdateResult.no_update:
                    raise HostsChangedError(
                        f"hvd.elastic.run: hosts were {_CHANGES[exc.update & 3]} "
                        "while the job ran, but an MPI job keeps the processes it started "
                        "with, so it cannot follow. HINT: save a checkpoint and requeue the "
                        "job on the new hosts (docs/migrating-from-horovod.md)"
                    ) from exc
                skip_sync = exc.skip_sync
            reset()
            state.on_reset()

    return wrapper
