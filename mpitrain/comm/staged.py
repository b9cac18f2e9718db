"""Staged path: device tensor -> pinned host buffer -> host all-reduce -> back to the device.

The copies run on a dedicated copy stream, ordered after the compute stream's work by an
event. Operations form a pipeline: starting bucket k+1 enqueues its device-to-host copy and
only then starts bucket k's host all-reduce (waiting for k's copy), so the copy of k+1
overlaps the reduction of k. Results are copied back on the copy stream and the compute
stream waits for that event (the host does not block on it).

Streams and events sit behind :class:`CopyEngine`; on host tensors :class:`HostCopies` turns
them into plain synchronous copies, so the buffer pool, the pipeline order and the double
buffering are the same code in CI (forced staged mode on CPU) as on a GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mpitrain.comm.handle import DONE, Handle

if TYPE_CHECKING:
    from mpitrain.comm.reducer import Reducer

Event = Any  # torch.cuda.Event on a GPU, None on the host


class CopyEngine(Protocol):
    """Stream/event operations the staged pipeline needs (no-ops or plain copies on a host)."""

    def ready(self, t: torch.Tensor) -> Event:
        """Record an event after the work queued so far on ``t``'s compute stream."""

    def to_host(self, src: torch.Tensor, dst: torch.Tensor, after: Event) -> Event:
        """Copy ``src`` to host buffer ``dst`` once ``after`` fired; return the copy's event."""

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> Event:
        """Copy host ``src`` back to ``dst``; return the copy's event."""

    def host_wait(self, ev: Event) -> None:
        """Block the host until ``ev`` fired."""

    def done(self, ev: Event) -> bool:
        """Whether ``ev`` fired (never blocks)."""

    def compute_wait(self, t: torch.Tensor, ev: Event) -> None:
        """Make ``t``'s compute stream wait for ``ev`` (the host does not block)."""


class HostCopies:
    """CopyEngine for host tensors: synchronous copies, events are always complete."""

    def ready(self, t: torch.Tensor) -> Event:
        """Nothing is queued on a host."""
        return None

    def to_host(self, src: torch.Tensor, dst: torch.Tensor, after: Event) -> Event:
        """Copy now."""
        dst.copy_(src.reshape(-1))
        return None

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> Event:
        """Copy now."""
        dst.view(-1).copy_(src)
        return None

    def host_wait(self, ev: Event) -> None:
        """Nothing to wait for."""

    def done(self, ev: Event) -> bool:
        """Always complete."""
        return True

    def compute_wait(self, t: torch.Tensor, ev: Event) -> None:
        """Nothing to wait for."""


class CudaCopies:
    """CopyEngine for one CUDA device: a dedicated copy stream and events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def _event(self) -> Event:
        return torch.cuda.Event()  # type: ignore[no-untyped-call]

    def ready(self, t: torch.Tensor) -> Event:
        """Record an event on the current (compute) stream."""
        ev = self._event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def to_host(self, src: torch.Tensor, dst: torch.Tensor, after: Event) -> Event:
        """Device-to-host copy on the copy stream after ``after``."""
        ev = self._event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            dst.copy_(src.reshape(-1), non_blocking=True)
            src.record_stream(self.stream)
            ev.record(self.stream)
        return ev

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> Event:
        """Host-to-device copy on the copy stream."""
        ev = self._event()
        with torch.cuda.stream(self.stream):
            dst.view(-1).copy_(src, non_blocking=True)
            dst.record_stream(self.stream)
            ev.record(self.stream)
        return ev

    def host_wait(self, ev: Event) -> None:
        """Block on this event only."""
        ev.synchronize()

    def done(self, ev: Event) -> bool:
        """Query the event."""
        return bool(ev.query())

    def compute_wait(self, t: torch.Tensor, ev: Event) -> None:
        """Order the compute stream after ``ev``."""
        torch.cuda.current_stream(self.device).wait_event(ev)


class BufferPool:
    """Host buffers by (numel, dtype): allocated once, reused while free (pinned on CUDA hosts)."""

    def __init__(self, *, pin: bool | None = None) -> None:
        self.pin = bool(torch.cuda.is_available()) if pin is None else pin
        self.allocations = 0
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}

    def acquire(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Return a free buffer of that shape, allocating only when none is free."""
        free = self._free.setdefault((numel, dtype), [])
        if free:
            return free.pop()
        self.allocations += 1
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin)

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back (its last copy is ordered on the copy stream before any reuse)."""
        self._free[(buf.numel(), buf.dtype)].append(buf)

    def total_bytes(self) -> int:
        """Bytes held in free buffers."""
        return sum(b.numel() * b.element_size() for bs in self._free.values() for b in bs)


class _Staged:
    __slots__ = ("average", "buf", "copied", "copies", "done", "inner", "t")

    def __init__(
        self, t: torch.Tensor, buf: torch.Tensor, copies: CopyEngine, copied: Event, average: bool
    ) -> None:
        self.t, self.buf, self.copies, self.copied, self.average = t, buf, copies, copied, average
        self.inner: Handle | None = None
        self.done = False


class _StagedHandle:
    __slots__ = ("_op", "_owner")

    def __init__(self, owner: StagedReducer, op: _Staged) -> None:
        self._owner, self._op = owner, op

    def wait(self) -> None:
        """Start this and earlier reductions, wait, copy back."""
        self._owner._wait(self._op)

    def test(self) -> bool:
        """Start reductions whose copies are done; True (after copy-back) when complete."""
        return self._owner._test(self._op)


class StagedReducer:
    """Reducer for device tensors over a host ``inner`` reducer, through reused host buffers.

    Also usable on host tensors (forced staged mode), with the same pipeline and buffers.
    """

    def __init__(
        self,
        inner: Reducer,
        *,
        pin: bool | None = None,
        copies: dict[str, CopyEngine] | None = None,
    ) -> None:
        self.inner = inner
        self.pool = BufferPool(pin=pin)
        self._copies: dict[str, CopyEngine] = {"cpu": HostCopies(), **(copies or {})}
        self._pending: deque[_Staged] = deque()  # copied to host, reduction not started yet
        self._lock = threading.RLock()

    @property
    def size(self) -> int:
        """Number of ranks the inner reducer spans."""
        return self.inner.size

    def copies_for(self, t: torch.Tensor) -> CopyEngine:
        """The copy engine of ``t``'s device (one copy stream per CUDA device)."""
        key = str(t.device)
        engine = self._copies.get(key)
        if engine is None:
            engine = self._copies[key] = CudaCopies(t.device)
        return engine

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: stage ``t`` to host and start the previous bucket's host all-reduce."""
        if not t.is_contiguous():
            raise ValueError("in-place collectives need a contiguous tensor; call .contiguous()")
        if t.numel() == 0 or self.inner.size == 1:
            return DONE
        with self._lock:
            copies = self.copies_for(t)
            buf = self.pool.acquire(t.numel(), t.dtype)
            copied = copies.to_host(t, buf, after=copies.ready(t))
            op = _Staged(t, buf, copies, copied, average)
            self._pending.append(op)
            # double buffering: bucket k+1's copy is queued, now reduce bucket k
            while len(self._pending) > 1:
                self._start(self._pending.popleft())
            return _StagedHandle(self, op)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking staged sum/average of ``t``."""
        self.iallreduce_(t, average=average).wait()

    def _start(self, op: _Staged) -> None:
        op.copies.host_wait(op.copied)
        op.inner = self.inner.iallreduce_(op.buf, average=op.average)

    def _start_through(self, op: _Staged, *, block: bool) -> bool:
        """Start pending reductions in FIFO order up to ``op``; False if a copy is not done."""
        while op.inner is None:
            head = self._pending[0]
            if not block and not head.copies.done(head.copied):
                return False
            self._start(self._pending.popleft())
        return True

    def _finish(self, op: _Staged) -> None:
        back = op.copies.to_device(op.buf, op.t)
        op.copies.compute_wait(op.t, back)
        self.pool.release(op.buf)
        op.done = True

    def _wait(self, op: _Staged) -> None:
        with self._lock:
            if op.done:
                return
            self._start_through(op, block=True)
            assert op.inner is not None
            op.inner.wait()
            self._finish(op)

    def _test(self, op: _Staged) -> bool:
        with self._lock:
            if op.done:
                return True
            if not self._start_through(op, block=False):
                return False
            assert op.inner is not None
            if op.inner.test():
                self._finish(op)
            return op.done
