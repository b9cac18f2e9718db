"""The gradient exchange engine shared by DataParallel and DistributedOptimizer.

Every parameter's ``.grad`` is a view into a flat bucket buffer. A post-accumulate-grad hook
counts gradients as autograd finishes them; once all of a bucket's gradients are in (after
``passes_per_step`` backward passes), its hook starts a non-blocking reduction while backward
continues. Buckets start strictly in bucket order on every rank (a bucket that fills early
waits for the ones before it), so ranks always issue the same collectives in the same order.
:meth:`GradEngine.synchronize` starts whatever is left (buckets holding parameters that got no
gradient this step contribute their current values — zeros after ``zero_grad`` — on every
rank) and waits for all handles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mpitrain.comm.handle import Handle
from mpitrain.errors import CommError, with_hint
from mpitrain.grad.buckets import Bucket, BucketPlan, bucket_bytes_from_mb, build_buckets
from mpitrain.grad.hooks import Hook, HookState
from mpitrain.timeline.recorder import NULL, Timeline


class GradEngine:
    """Buckets, hooks and in-flight handles for one set of parameters."""

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        hook: Hook,
        state: HookState,
        bucket_mb: float | None = None,
        overlap: bool = True,
        passes_per_step: int = 1,
    ) -> None:
        if passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {passes_per_step}")
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.hook = hook
        self.state = state
        self.overlap = overlap
        self.passes_per_step = passes_per_step
        self.enabled = True
        self.timeline: Timeline = NULL  # bucket launch/flight/wait spans (mpitrain.timeline)
        self.plan: BucketPlan = build_buckets(
            self.names, self.params, bucket_bytes_from_mb(bucket_mb)
        )
        self.buckets: list[Bucket] = self.plan.buckets
        self._views = self.plan.views
        self._bucket_of = self.plan.bucket_of
        self._counts = [0] * len(self.params)
        self._pending = [len(b.params) for b in self.buckets]
        self._handles: list[Handle | None] = [None] * len(self.buckets)
        self._next = 0
        self._polled = 0
        with torch.no_grad():
            for p, v in zip(self.params, self._views, strict=True):
                if p.grad is not None:
                    v.copy_(p.grad)
                p.grad = v
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(self.params)
        ]

    # ---- gradient storage ------------------------------------------------------------------
    def attach_grads(self) -> None:
        """Point every ``.grad`` back at its bucket view (zeroed if it had been set to None)."""
        for p, v in zip(self.params, self._views, strict=True):
            g = p.grad
            if g is v:
                continue
            with torch.no_grad():
                if g is None:
                    v.zero_()
                else:
                    v.copy_(g)
            p.grad = v

    def zero_grads(self) -> None:
        """Zero every flat buffer in place and keep the views attached."""
        for buf in self.plan.buffers.values():
            buf.zero_()
        for p, v in zip(self.params, self._views, strict=True):
            if p.grad is not v:
                p.grad = v

    # ---- backward-time machinery -------------------------------------------------------------
    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def on_grad(p: torch.Tensor) -> None:
            self._on_grad(i, p)

        return on_grad

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        v = self._views[i]
        g = p.grad
        if g is not v:  # grad was None before backward (set_to_none) or replaced
            with torch.no_grad():
                if g is None:
                    v.zero_()
                else:
                    v.copy_(g)
            p.grad = v
        if not self.enabled:
            return
        self._counts[i] += 1
        if self._counts[i] > self.passes_per_step:
            raise CommError(
                with_hint(
                    f"gradient of {self.names[i]!r} computed {self._counts[i]} times before "
                    f"synchronize() (expected {self.passes_per_step})",
                    "call synchronize()/step() after each backward, accumulate micro-batches "
                    "inside model.no_sync(), or raise backward_passes_per_step",
                )
            )
        if self._counts[i] == self.passes_per_step:
            b = self._bucket_of[i]
            self._pending[b] -= 1
            if self.overlap and self._pending[b] == 0:
                self._launch_ready()
        if self._polled < self._next:
            self._poll()

    def _launch(self, b: int) -> None:
        tl = self.timeline
        if tl.on:
            t0 = tl.now()
            self._handles[b] = self.hook(self.state, self.buckets[b])
            tl.bucket_launched(b, self.buckets[b].nbytes, t0, self.state.reducer.size)
            return
        self._handles[b] = self.hook(self.state, self.buckets[b])

    def _poll(self) -> None:
        # drive progress of in-flight buckets: MPI progresses only inside MPI calls
        while self._polled < self._next:
            h = self._handles[self._polled]
            if h is not None and not h.test():
                return
            if self.timeline.on:
                self.timeline.bucket_done(self._polled)
            self._polled += 1

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self._next += 1

    # ---- step boundary -----------------------------------------------------------------------
    def synchronize(self) -> None:
        """Collective: start the remaining buckets in order, wait for all, reset for next step."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        tl = self.timeline
        for b, h in enumerate(self._handles):
            if h is not None:
                t0 = tl.now() if tl.on else 0
                h.wait()
                if tl.on:
                    tl.bucket_waited(b, t0)
                self._handles[b] = None
        self.reset()

    def reset(self) -> None:
        """Forget this step's gradient counts (in-flight handles must have been waited)."""
        for i in range(len(self._counts)):
            self._counts[i] = 0
        for b, bucket in enumerate(self.buckets):
            self._pending[b] = len(bucket.params)
        self._next = 0
        self._polled = 0

    def remove_hooks(self) -> None:
        """Detach the engine from its parameters (grads stay as they are)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def describe(self) -> str:
        """One line: buckets, sizes and dtypes."""
        sizes = ", ".join(f"{b.nbytes / 2**20:.2f}MiB/{b.dtype}" for b in self.buckets)
        return f"{len(self.params)} params in {len(self.buckets)} buckets [{sizes}]"
