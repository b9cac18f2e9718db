"""Gradient side of ZeRO: per-bucket reduce-scatter started from post-accumulate-grad hooks.

Stage 1 (``keep_full=True``) keeps one full flat gradient buffer whose slices are the module
parameters' ``.grad`` (autograd accumulates into it); each bucket is reduce-scattered in place,
so this rank's averaged chunk lands at the head of the bucket and is the shard gradient.
Stage 2 (``keep_full=False``) keeps only the shard gradients: when a bucket is ready its
full-size buffer is allocated, the parameters' ``.grad`` pieces are copied in (a ``.grad`` is
dropped once its last bucket has started), it is reduce-scattered into this rank's shard
buffer and released as soon as the reduction completes. At most ``max_inflight`` such buffers
are alive: starting one more first waits for the oldest, which bounds the transient memory
(FSDP's all-gather rate limiter, for reduce-scatter).

Buckets start strictly in bucket order on every rank (one that completes early waits for the
ones before it); :meth:`ShardedGrads.synchronize` starts the rest (parameters that got no
gradient contribute zeros) and waits. Inside ``no_sync`` the hooks only let gradients
accumulate in ``.grad`` (stage 2 then holds full gradients until the last micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.handle import ChainedHandle, Handle
from mpitrain.errors import CommError, with_hint
from mpitrain.grad.buckets import alloc_buffer
from mpitrain.grad.recorded import recorded
from mpitrain.grad.zero.layout import ShardLayout
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpitrain.comm.shards import ShardComm


class ShardedGrads:
    """Hooks, buckets and in-flight reduce-scatters for one set of parameters."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        layout: ShardLayout,
        transport: ShardComm,
        *,
        keep_full: bool,
        overlap: bool = True,
        max_inflight: int = 2,
        compress: torch.dtype | None = None,
    ) -> None:
        self.params = list(params)
        self.names = [s.name for s in layout.slots]
        self.layout = layout
        self.transport = transport
        self.keep_full = keep_full
        self.overlap = overlap
        self.max_inflight = max(1, max_inflight)
        #: float16/bfloat16: buckets are reduce-scattered in that type (half the bytes), after
        #: dividing by the ranks (the fp16/bf16 hooks' rule: no float16 overflow in the sum)
        self.compress = compress
        #: wait for the oldest reduce-scatter when ``max_inflight`` are alive (stages 1-2);
        #: ZeRO-3 only tests it: a rank blocked inside a backward hook would never post the
        #: parameter gather another rank, whose bucket is not ready yet, is waiting for
        self.block_on_limit = True
        self.enabled = True
        #: called with a bucket's index once all its parameters have their gradient
        #: (ZeRO-3 frees the bucket's gathered parameters there)
        self.on_ready: Callable[[int], None] | None = None
        self.dirty = False  # stage 1: full buffer holds reduce-scatter leftovers
        #: records each bucket's reduce-scatter ("reduce-scatter b3": start, flight, wait)
        self.timeline: Timeline = NULL
        spans = layout.buckets
        dtype = torch.float32
        device = self.device = self.params[0].device if self.params else torch.device("cpu")
        self.full: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        if keep_full:
            full = self.full = alloc_buffer(layout.total, dtype, device)
            for i, slot in enumerate(layout.slots):
                a, b = layout.full_range(i)
                self.views.append(full[a:b].view(slot.shape))
            self.shard_grads = [full[s.offset : s.offset + s.chunk] for s in spans]
        else:
            store = self.shard_store = alloc_buffer(layout.shard_numel(), dtype, device)
            self.shard_grads, at = [], 0
            for s in spans:
                self.shard_grads.append(store[at : at + s.chunk])
                at += s.chunk
        self._bufs: list[torch.Tensor | None] = [None] * len(spans)  # stage 2, per step
        self._counts = [0] * len(self.params)
        self._pending = [len(s.params) for s in spans]
        self._handles: list[Handle | None] = [None] * len(spans)
        self._next = 0
        self._polled = 0
        self.peak_transient = 0  # stage 2: most bytes of full bucket buffers alive at once
        self._alive = 0
        self.attach()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(self.params)
        ]

    # ---- gradient storage -----------------------------------------------------------------
    def attach(self) -> None:
        """Before a step's first forward: stage 1 zeroes the full buffer and re-attaches views."""
        if not self.keep_full:
            return
        assert self.full is not None
        if self.dirty:
            self.full.zero_()
            self.dirty = False
        for p, v in zip(self.params, self.views, strict=True):
            if p.grad is not v:
                with torch.no_grad():
                    if p.grad is not None:
                        v.copy_(p.grad)
                p.grad = v

    def _bucket_buf(self, b: int) -> torch.Tensor:
        buf = self._bufs[b]
        if buf is None:
            buf = self._bufs[b] = torch.zeros(self.layout.buckets[b].padded(self.layout.ranks),
                                              device=self.device)
            self._alive += buf.numel() * 4
            self.peak_transient = max(self.peak_transient, self._alive)
        return buf

    def _take(self, i: int, p: torch.Tensor) -> None:
        """Move parameter ``i``'s ``.grad`` into its bucket's storage."""
        g = p.grad
        if self.keep_full:
            v = self.views[i]
            if g is not v:
                with torch.no_grad():
                    if g is None:
                        v.zero_()
                    else:
                        v.copy_(g)
                p.grad = v
            return
        # stage 2: the .grad stays until its buckets start (_fill copies it, then drops it)

    # ---- backward-time machinery ------------------------------------------------------------
    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def on_grad(p: torch.Tensor) -> None:
            self._on_grad(i, p)

        return on_grad

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self.enabled:
            return
        self._counts[i] += 1
        if self._counts[i] > 1:
            raise CommError(
                with_hint(
                    f"gradient of {self.names[i]!r} computed twice before synchronize()",
                    "call synchronize()/step() after each backward, or accumulate "
                    "micro-batches inside model.no_sync()",
                )
            )
        self._take(i, p)
        ready = False
        for b in self.layout.slots[i].buckets:
            self._pending[b] -= 1
            ready = ready or self._pending[b] == 0
            if self._pending[b] == 0 and self.on_ready is not None:
                self.on_ready(b)
        if self.overlap and ready:
            while self._next < len(self._pending) and self._pending[self._next] == 0:
                self._launch(self._next)
                self._next += 1
        self._poll()

    def _fill(self, b: int) -> torch.Tensor:
        """Stage 2: copy bucket ``b``'s pieces of every ``.grad`` into a fresh buffer."""
        while sum(x is not None for x in self._bufs) >= self.max_inflight:
            h = self._handles[self._polled]  # the oldest in flight: wait, which releases it
            if h is not None and not self.block_on_limit and not h.test():
                break  # ZeRO-3: never block in a hook (the other ranks may wait on a gather)
            if h is not None:
                h.wait()
            self._polled += 1
        buf = self._bucket_buf(b)
        lay = self.layout
        with torch.no_grad():
            for i in lay.buckets[b].params:
                p = self.params[i]
                g = p.grad
                at = 0
                for pb, start, n in lay.pieces(i):
                    if pb == b and g is not None:
                        buf[start : start + n].copy_(g.reshape(-1)[at : at + n])
                    at += n
                if lay.slots[i].buckets[-1] == b:
                    p.grad = None  # its last bucket has its piece now
        return buf

    def _launch(self, b: int) -> None:
        span = self.layout.buckets[b]
        if self.keep_full:
            for i in span.params:  # parameters that got no gradient in this backward
                if self._counts[i] == 0:
                    self._take(i, self.params[i])
            assert self.full is not None
            start = span.offset
            buf = self.full[start : start + span.padded(self.layout.ranks)]
        else:
            buf = self._fill(b)
        nbytes = buf.numel() * (buf.element_size() if self.compress is None
                                else self.compress.itemsize)  # what travels
        self._handles[b] = recorded(self.timeline, f"reduce-scatter b{b}", nbytes,
                                    "reduce-scatter", lambda: self._reduce_scatter(b, buf))

    def _reduce_scatter(self, b: int, buf: torch.Tensor) -> Handle:
        """Start bucket ``b``'s reduce-scatter of ``buf`` (stage 2: into its shard gradient,
        then the buffer is released)."""
        release = (lambda: None) if self.keep_full else (lambda: self._release(b))
        if self.compress is not None:
            return self._compressed(buf, b, release)
        if self.keep_full:
            return self.transport.ireduce_scatter_(buf, None, average=True)
        inner = self.transport.ireduce_scatter_(buf, self.shard_grads[b], average=True)
        return ChainedHandle(inner, release)

    def _compressed(self, full: torch.Tensor, b: int, release: Callable[[], None]) -> Handle:
        """Reduce-scatter ``full`` in ``self.compress``; the float32 shard gradient after."""
        assert self.compress is not None
        full.div_(self.transport.size)
        half = full.to(self.compress)
        out = torch.empty(self.layout.buckets[b].chunk, dtype=self.compress, device=self.device)
        inner = self.transport.ireduce_scatter_(half, out, average=False)

        def finish() -> None:
            self.shard_grads[b].copy_(out)
            release()

        return ChainedHandle(inner, finish)

    def _release(self, b: int) -> None:
        buf = self._bufs[b]
        if buf is not None:
            self._alive -= buf.numel() * 4
            self._bufs[b] = None

    def _poll(self) -> None:
        while self._polled < self._next:
            h = self._handles[self._polled]
            if h is not None and not h.test():
                return
            self._polled += 1

    # ---- step boundary ----------------------------------------------------------------------
    def synchronize(self) -> None:
        """Collective: start the remaining buckets in order, wait for all, reset counts."""
        while self._next < len(self._pending):
            self._launch(self._next)
            self._next += 1
        for b, h in enumerate(self._handles):
            if h is not None:
                h.wait()
                self._handles[b] = None
        if self.keep_full:
            self.dirty = True  # the buffer outside the shard heads holds partial sums now
            for p in self.params:
                p.grad = None
        for i in range(len(self._counts)):
            self._counts[i] = 0
        for b, span in enumerate(self.layout.buckets):
            self._pending[b] = len(span.params)
        self._next = 0
        self._polled = 0

    def remove_hooks(self) -> None:
        """Detach from the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def nbytes(self) -> int:
        """Bytes of persistent gradient storage held by this rank."""
        if self.full is not None:
            return self.full.numel() * self.full.element_size()
        return self.shard_store.numel() * self.shard_store.element_size()
