"""Operations in flight and Horovod's integer handles.

An :class:`Op` owns one collective: the transport handle (or the communication thread's,
:mod:`mpitrain.horovod.engine`), the finishing step that produces the result, or the error
every rank agreed on. ``*_async`` functions return a
:class:`HvdHandle`, an ``int`` (Horovod's handle type, so code that stores, hashes or compares
handles keeps working) that also owns its Op. The context keeps ``int -> Op`` only because
Horovod's ``synchronize(handle)`` is specified on integers; entries leave at synchronize.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mpitrain.comm.handle import DONE, Handle
from mpitrain.horovod import context as _c


class Op:
    """One collective in flight; also a transport :class:`~mpitrain.comm.handle.Handle`."""

    __slots__ = ("_done", "_error", "_finish", "_inner", "_result", "_source", "name", "number",
                 "span")

    def __init__(self, inner: Handle = DONE, finish: Callable[[], Any] | None = None,
                 error: BaseException | None = None, name: str | None = None,
                 span: tuple[str, int] | None = None, source: Any = None) -> None:
        self.span = span  # (timeline span name, start) while hvd.start_timeline records
        self._source = source  # a queued operation: its error and finish are set when it ran
        self._inner = inner
        self._finish = finish
        self._error = error
        self._result: Any = None
        self._done = False
        self.name = name
        self.number: int | None = None

    def _complete(self) -> None:
        self._done = True
        if self._source is not None:
            self._error, self._finish, self._source = (self._source.error,
                                                       self._source.finish, None)
        if self._error is None and self._finish is not None:
            self._result = self._finish()
        self._finish = None
        self._inner = DONE
        ctx = _c.current()
        if ctx is not None:
            if self.name is not None and ctx.in_flight.get(self.name) == id(self):
                del ctx.in_flight[self.name]
            if self.span is not None and ctx.timeline.on:
                ctx.timeline.span(self.span[0], self.span[1], cat="comm")

    def wait(self) -> None:
        """Block until complete (raises the agreed error, if any)."""
        if not self._done:
            self._inner.wait()
            self._complete()
        if self._error is not None:
            raise self._error

    def test(self) -> bool:
        """Return True when complete; never blocks."""
        if not self._done and self._inner.test():
            self._complete()
        return self._done

    def result(self) -> Any:
        """Wait, then return the output."""
        self.wait()
        return self._result


class HvdHandle(int):
    """Horovod's handle: an ``int`` that owns its :class:`Op`."""

    op: Op

    def __new__(cls, number: int, op: Op) -> HvdHandle:
        obj = super().__new__(cls, number)
        obj.op = op
        return obj


def register(op: Op) -> HvdHandle:
    """Number ``op`` in the context's handle table and return its handle."""
    ctx = _c.context()
    number = ctx.next_handle
    ctx.next_handle += 1
    op.number = number
    ctx.handles[number] = op
    return HvdHandle(number, op)


def _lookup(handle: Any) -> Op | None:
    if isinstance(handle, HvdHandle):
        return handle.op
    if isinstance(handle, Op):
        return handle
    ctx = _c.current()
    if ctx is None or not isinstance(handle, int):
        return None
    return ctx.handles.get(handle)


def synchronize(handle: Any) -> Any:
    """Wait for an asynchronous operation and return its output.

    Unknown handles return None (as in Horovod); a sparse all-reduce handle is a callable.
    Raises HorovodInternalError when the ranks disagreed about the operation.
    """
    if callable(handle) and not isinstance(handle, int | Op):
        return handle()
    op = _lookup(handle)
    if op is None:
        return None
    ctx = _c.current()
    try:
        return op.result()
    finally:
        if ctx is not None and op.number is not None:
            ctx.handles.pop(op.number, None)


def poll(handle: Any) -> bool:
    """Return True once the asynchronous operation has completed (never blocks)."""
    op = _lookup(handle)
    if op is None:
        raise ValueError(f"hvd.poll: unknown handle {handle!r}")
    if op.test():
        return True
    time.sleep(0)  # let the communication thread take the GIL (a loop on poll would keep it)
    return False
