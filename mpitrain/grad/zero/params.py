"""Parameter side of ZeRO-3: parameters live as shards, gathered per unit around their use.

Each unit (a submodule; its parameters are one bucket of the layout) keeps one flat buffer
whose storage is allocated only while the unit is gathered; the module's parameters are
views of it, so autograd's saved tensors see the data again when the storage is refilled
for backward (PyTorch FSDP's free-by-resize). Gathers run on their own duplicate of the
communicator, so they never pair with the gradient reduce-scatters, and **in one fixed
order on every rank** (the units' registration order forward, the reverse backward): a
unit's hook first starts every earlier unit of the sequence, and the end of the forward
(and of the backward) completes the sequence, so a rank that skips a branch still makes the
same collective calls as one that runs it. The next unit is prefetched while one computes.
A unit is freed after its forward and once all its gradients are in (backward).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpitrain.comm.handle import Handle
from mpitrain.errors import CheckpointError, with_hint
from mpitrain.grad.recorded import recorded
from mpitrain.grad.zero.layout import ShardLayout
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpitrain.comm.shards import ShardComm


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedParams:
    """Shards, gather buffers and hooks for ``units`` (``buckets[u]`` = unit u's bucket).

    ``always`` is the bucket of parameters outside every unit (the root's own), kept
    gathered (refreshed by :meth:`gather_always` after each optimizer step), or None.
    With ``param_dtype`` (bf16/fp16) the shards stay float32 masters while the gathered
    parameters, and so the compute, are in that type (gathers move half the bytes); the root
    casts floating inputs to it and floating outputs back to float32.
    """

    def __init__(
        self, root: nn.Module, units: Sequence[nn.Module], buckets: Sequence[int],
        always: int | None, params: Sequence[nn.Parameter], layout: ShardLayout,
        transport: ShardComm, rank: int, param_dtype: torch.dtype | None = None,
    ) -> None:
        self.layout, self.units, self.always = layout, list(units), always
        self.param_dtype = param_dtype
        self.buckets = list(buckets)
        #: the gathers' own transport (own communicators: they never pair with the
        #: gradients' reduce-scatters)
        self.transport = transport
        self.rank = rank
        #: records each gather ("all-gather b3": start, flight, the wait before use)
        self.timeline: Timeline = NULL
        # the first unit's inputs need no gradient: torch warns that its pre-backward hook
        # fires on the outputs' gradients, which is just when the gather is needed
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients",
                                category=UserWarning)
        ranks = layout.ranks
        n_buckets = len(layout.buckets)
        device = params[0].device if params else torch.device("cpu")
        master = [torch.zeros(s.padded(ranks), device=device) for s in layout.buckets]
        self.shards: list[nn.Parameter] = []
        with torch.no_grad():
            for i, p in enumerate(params):
                master[self._bucket(i)][self._span(i)].copy_(p.reshape(-1))
            for s in layout.buckets:
                chunk = master[s.index][rank * s.chunk : (rank + 1) * s.chunk]
                self.shards.append(nn.Parameter(chunk.clone()))
            self.full = master if param_dtype is None else [m.to(param_dtype) for m in master]
            for i, p in enumerate(params):
                p.data = self.full[self._bucket(i)][self._span(i)].view(layout.slots[i].shape)
        self.live = [True] * n_buckets
        self.handles: list[Handle | None] = [None] * n_buckets
        self.keep = False  # inside gathered(): nothing is freed
        self.fwd_next = 0
        self.bwd_next = -1
        self._callback_queued = False
        self.live_bytes = sum(_nbytes(f) for b, f in enumerate(self.full) if b != always)
        for b in range(n_buckets):
            if b != always:
                self._free(b)
        #: most bytes of units' full parameters gathered at once (the root's own not counted)
        self.peak_live_bytes = 0
        self._hooks: list[Any] = [root.register_forward_pre_hook(self._root_pre_forward),
                                  root.register_forward_hook(self._root_post_forward)]
        for u, m in enumerate(self.units):
            self._hooks += self._unit_hooks(u, m)

    def _bucket(self, i: int) -> int:
        return self.layout.slots[i].buckets[0]

    def _span(self, i: int) -> slice:
        slot = self.layout.slots[i]
        a = slot.offset - self.layout.buckets[slot.buckets[0]].offset
        return slice(a, a + slot.numel)

    def load_(self, values: dict[int, torch.Tensor]) -> None:
        """Set the master shards from full per-parameter values (no communication; every
        rank passes the same values): float32 kept as it is, whatever ``param_dtype``."""
        missing = [s.name for i, s in enumerate(self.layout.slots) if i not in values]
        if missing:
            raise CheckpointError(with_hint(
                f"the state to load lacks parameter(s) {', '.join(missing[:5])}",
                "load a checkpoint of the same model"))
        rank = self.rank
        with torch.no_grad():
            for b, span in enumerate(self.layout.buckets):
                flat = torch.zeros(span.padded(self.layout.ranks), device=self.shards[b].device)
                for i in span.params:
                    if i in values:
                        flat[self._span(i)].copy_(values[i].reshape(-1))
                self.shards[b].copy_(flat[rank * span.chunk : (rank + 1) * span.chunk])
        self.gather_always()

    def _unit_hooks(self, u: int, m: nn.Module) -> list[Any]:
        def pre(_m: nn.Module, _a: Any) -> None:
            self._pre_forward(u)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            self._post_forward(u)

        def pre_backward(_m: nn.Module, _g: Any) -> None:
            self._pre_backward(u)

        return [m.register_forward_pre_hook(pre), m.register_forward_hook(post),
                m.register_full_backward_pre_hook(pre_backward)]

    # ---- one bucket ---------------------------------------------------------------------------
    def _start(self, b: int) -> None:
        if self.live[b]:
            return
        span, rank = self.layout.buckets[b], self.rank
        buf = self.full[b]
        buf.untyped_storage().resize_(buf.numel() * buf.element_size())
        with torch.no_grad():
            buf[rank * span.chunk : (rank + 1) * span.chunk].copy_(self.shards[b])
        self.handles[b] = self._gather(b)
        self.live[b] = True
        self.live_bytes += _nbytes(buf)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)

    def _gather(self, b: int) -> Handle:
        """Start bucket ``b``'s all-gather into its full buffer (recorded in the timeline)."""
        buf = self.full[b]
        return recorded(self.timeline, f"all-gather b{b}", buf.numel() * buf.element_size(),
                        "all-gather", lambda: self.transport.iallgather_(buf))

    def _wait(self, b: int) -> None:
        h = self.handles[b]
        if h is not None:
            h.wait()
            self.handles[b] = None

    def _free(self, b: int) -> None:
        if not self.live[b] or self.keep or b == self.always:
            return
        self._wait(b)
        self.full[b].untyped_storage().resize_(0)
        self.live[b] = False
        self.live_bytes -= _nbytes(self.full[b])

    def free_bucket(self, b: int) -> None:
        """A bucket's gradients are all in (backward): its parameters may go."""
        if b in self.buckets:
            self._free(b)

    # ---- the sequences ------------------------------------------------------------------------
    def _root_pre_forward(self, _m: nn.Module, args: Any) -> Any:
        self.fwd_next = 0
        if self.param_dtype is None:
            return None
        dt = self.param_dtype
        return tuple(a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)

    def _pre_forward(self, u: int) -> None:
        if u < self.fwd_next:  # used again in this forward: gathered again (all ranks alike)
            self._start(self.buckets[u])
        while self.fwd_next <= u:
            self._start(self.buckets[self.fwd_next])
            self.fwd_next += 1
        if self.fwd_next < len(self.units):  # prefetch the next unit
            self._start(self.buckets[self.fwd_next])
            self.fwd_next += 1
        self._wait(self.buckets[u])

    def _post_forward(self, u: int) -> None:
        self._free(self.buckets[u])

    def _root_post_forward(self, _m: nn.Module, _a: Any, out: Any) -> Any:
        """Complete the forward sequence (units this rank skipped), then arm the backward's."""
        while self.fwd_next < len(self.units):
            self._start(self.buckets[self.fwd_next])
            self.fwd_next += 1
        for b in self.buckets:
            self._free(b)
        self.bwd_next = len(self.units) - 1 if torch.is_grad_enabled() else -1
        self._callback_queued = False
        if self.param_dtype is not None and isinstance(out, torch.Tensor) \
                and out.is_floating_point():
            return out.float()
        return None

    def _pre_backward(self, u: int) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(  # type: ignore[attr-defined]
                self._close_backward)
        if self.bwd_next < u:  # used again: gathered again
            self._start(self.buckets[u])
        while self.bwd_next >= u:
            self._start(self.buckets[self.bwd_next])
            self.bwd_next -= 1
        if self.bwd_next >= 0:  # prefetch the unit before
            self._start(self.buckets[self.bwd_next])
            self.bwd_next -= 1
        self._wait(self.buckets[u])

    def _close_backward(self) -> None:
        while self.bwd_next >= 0:
            self._start(self.buckets[self.bwd_next])
            self.bwd_next -= 1
        for b in self.buckets:
            self._free(b)
        self._callback_queued = False

    def finish_backward(self) -> None:
        """Collective: complete a backward sequence that no hook ran (no unit had a gradient)."""
        if not self._callback_queued:
            self._close_backward()

    # ---- step boundary ------------------------------------------------------------------------
    def gather_always(self) -> None:
        """Collective: refresh the root's own parameters from their owners' shards."""
        b = self.always
        if b is None:
            return
        span, rank = self.layout.buckets[b], self.rank
        with torch.no_grad():
            self.full[b][rank * span.chunk : (rank + 1) * span.chunk].copy_(self.shards[b])
        self._gather(b).wait()

    @contextlib.contextmanager
    def gathered(self, *, writeback: bool = False) -> Iterator[None]:
        """Collective: every parameter gathered inside; ``writeback`` copies changes to shards."""
        if writeback and self.param_dtype is not None:
            raise ValueError("gathered(writeback=True) would round the float32 master shards to "
                             f"{self.param_dtype}; set values with load_() instead")
        for b in range(len(self.full)):
            self._start(b)
        for b in range(len(self.full)):
            self._wait(b)
        self.keep = True
        try:
            yield
        finally:
            self.keep = False
            rank = self.rank
            for b, span in enumerate(self.layout.buckets):
                if writeback:
                    with torch.no_grad():
                        mine = self.full[b][rank * span.chunk : (rank + 1) * span.chunk]
                        self.shards[b].copy_(mine)
                self._free(b)

    def remove_hooks(self) -> None:
        """Detach from the modules and free the gathers' transport (collective)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.transport.free()
