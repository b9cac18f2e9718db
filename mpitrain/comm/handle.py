"""Handles for asynchronous collectives: the caller owns them and calls ``wait()``.

There is no global handle map (Horovod's ``mpi_ops``): whoever starts an operation keeps the
handle it returns. Every handle satisfies :class:`Handle`; ``wait()`` is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mpi4py import MPI


@runtime_checkable
class Handle(Protocol):
    """An operation in flight; its result is visible once :meth:`wait` returns."""

    def wait(self) -> None:
        """Block until the operation (and any finishing step) is complete."""

    def test(self) -> bool:
        """Return True when complete (finishing it if so); never blocks. Drives progress."""


class CompletedHandle:
    """A handle for work already done (blocking paths, empty tensors, single rank)."""

    __slots__ = ()

    def wait(self) -> None:
        """Return at once."""

    def test(self) -> bool:
        """Return True."""
        return True


DONE = CompletedHandle()


class RequestHandle:
    """Wrap one MPI request; ``keep`` holds buffers alive until the request completes."""

    __slots__ = ("_done", "_keep", "_request")

    def __init__(self, request: MPI.Request, keep: Any = None) -> None:
        self._request = request
        self._keep = keep
        self._done = False

    def wait(self) -> None:
        """Wait for the request."""
        if not self._done:
            self._request.Wait()
            self._done = True
            self._keep = None

    def test(self) -> bool:
        """Test the request (lets MPI progress it)."""
        if not self._done and self._request.Test():
            self._done = True
            self._keep = None
        return self._done


class ChainedHandle:
    """Run ``finish()`` once after ``inner`` completes (average, decompress, copy back)."""

    __slots__ = ("_done", "_finish", "_inner")

    def __init__(self, inner: Handle, finish: Callable[[], None]) -> None:
        self._inner = inner
        self._finish = finish
        self._done = False

    def wait(self) -> None:
        """Wait for the inner handle, then finish."""
        if not self._done:
            self._inner.wait()
            self._finish()
            self._done = True

    def test(self) -> bool:
        """Finish and return True if the inner handle completed."""
        if not self._done and self._inner.test():
            self._finish()
            self._done = True
        return self._done


class MultiHandle:
    """Several handles waited in order as one."""

    __slots__ = ("_handles",)

    def __init__(self, handles: Sequence[Handle]) -> None:
        self._handles = list(handles)

    def wait(self) -> None:
        """Wait for every handle in order."""
        for h in self._handles:
            h.wait()

    def test(self) -> bool:
        """Test every handle; True when all are complete."""
        return all([h.test() for h in self._handles])
