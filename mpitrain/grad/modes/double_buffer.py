"""Double buffering: step t+1 applies step t's averaged gradients (one-step-stale SGD).

At the end of step t's backward, :meth:`DoubleBuffer.synchronize` copies the gradients into
one of two flat buffers and starts a non-blocking all-reduce on it, then waits for the
all-reduce started at step t-1 on the other buffer and installs that average as ``.grad``;
the optimizer step of step t therefore applies the average of step t-1's gradients
(step 0 applies zeros: no update). The all-reduce of step t runs while step t+1 computes.

MPI moves a non-blocking collective forward only inside MPI calls unless the library has
an asynchronous progress thread. ``progress`` chooses who drives it while the model computes:

* ``"poll"`` (default): the next backward's gradient hooks call ``MPI_Test`` (cheap, no thread);
* ``"thread"``: a helper thread calls ``MPI_Test`` every ``poll_us`` microseconds
  (needs ``MPI_THREAD_MULTIPLE``);
* ``"none"``: nothing; MPI progresses only in the final ``Wait`` (or by its own progress thread,
  e.g. MPICH with ``MPIR_CVAR_ASYNC_PROGRESS=1``).

docs/async.md has the measurements behind the default.

Delay compensation (DC-ASGD, Zheng et al., ICML 2017), off unless ``delay_compensation``
(λ) > 0: the stale gradient g, computed at the parameters w' of the previous step, is
corrected to the current parameters w by a diagonal Hessian approximation,
``g + λ · g ⊙ g ⊙ (w − w')``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.factory import close_reducer
from mpitrain.comm.handle import DONE, Handle
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.modes.base import (
    ModeWrapper,
    check_one_dtype,
    flat_grads,
    flat_params,
    numel,
    set_grads,
)
from mpitrain.grad.modes.transport import FlatTransport, transport_for
from mpitrain.grad.protocol import BuildContext, ModeSpec
from mpitrain.grad.recorded import recorded
from mpitrain.runtime.ulfm import derived
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig

PROGRESS = ("poll", "thread", "none")


class _Poller:
    """A helper thread that tests the in-flight handle so MPI progresses it during compute."""

    def __init__(self, poll_us: float) -> None:
        self.lock = threading.Lock()
        self.handle: Handle | None = None
        self._interval = poll_us / 1e6
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpitrain-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                h = self.handle
                if h is not None and h.test():
                    self.handle = None
            time.sleep(self._interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class DoubleBuffer(ModeWrapper):
    """Wrap ``module`` for one-step-stale data-parallel SGD over ``comm`` (collective).

    Args:
        module: the model.
        comm: the communicator (parameters are broadcast over it).
        progress: ``poll`` | ``thread`` | ``none`` (see the module docstring).
        delay_compensation: λ of DC-ASGD (0 = off).
        poll_us: helper-thread polling interval.
        transport: the all-reduce path (reducer + compression hook); default: a non-blocking
            host reducer on a duplicate of ``comm`` (staged for device parameters).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        comm: MPI.Intracomm,
        *,
        progress: str = "poll",
        delay_compensation: float = 0.0,
        poll_us: float = 200.0,
        transport: FlatTransport | None = None,
    ) -> None:
        super().__init__(module)
        if progress not in PROGRESS:
            raise ConfigError(
                with_hint(f"double-buffer progress {progress!r} is unknown", f"use {PROGRESS}")
            )
        broadcast_parameters(module, comm, root=0)
        self._own_comm: MPI.Intracomm | None = None
        if transport is None:
            from mpitrain.comm.factory import default_reducer

            self._own_comm = derived(comm.Dup())
            transport = FlatTransport(default_reducer(self._own_comm, self.params, overlap=True))
        self.transport = transport
        self.progress = progress
        self.lam = delay_compensation
        dtype = check_one_dtype(self.params, "double-buffer")
        n = numel(self.params)
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._bufs = [torch.zeros(n, dtype=dtype, device=dev) for _ in range(2)]
        self._parity = 0
        self._inflight: Handle = DONE
        self._has_pending = False  # the other buffer holds (or will hold) an average to apply
        self.steps = 0
        self.wait_seconds = 0.0
        self._last_wait = 0.0
        self._prev_w = torch.zeros(n, dtype=dtype, device=dev) if self.lam > 0 else None
        self._now_w = torch.zeros(n, dtype=dtype, device=dev) if self.lam > 0 else None
        self._poller = _Poller(poll_us) if progress == "thread" else None
        self.timeline: Timeline = NULL
        self._hooks = []
        if progress == "poll":
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._poll)  # type: ignore[no-untyped-call]
                for p in self.params
            ]

    def set_timeline(self, recorder: Timeline) -> None:
        """Record each step's all-reduce (started at synchronize, in flight through the next
        step's compute, waited on at the next synchronize) into ``recorder``."""
        self.timeline = recorder

    def _poll(self, _p: torch.Tensor) -> None:
        self._inflight.test()

    def _wait_inflight(self) -> None:
        t0 = time.perf_counter()
        if self._poller is not None:
            with self._poller.lock:
                self._inflight.wait()
                self._poller.handle = None
        else:
            self._inflight.wait()
        self._inflight = DONE
        self._last_wait = time.perf_counter() - t0
        self.wait_seconds += self._last_wait

    def synchronize(self) -> None:
        """Collective: start this step's all-reduce; install the previous step's average."""
        cur = self._bufs[self._parity]
        other = self._bufs[1 - self._parity]
        flat_grads(self.params, cur)
        self._wait_inflight()  # step t-1's average lands in `other`
        handle = recorded(self.timeline, "allreduce gradients", cur.numel() * cur.element_size(),
                          "allreduce", lambda: self.transport.iallreduce_(cur))
        if self._poller is not None:
            with self._poller.lock:
                self._poller.handle = handle
        self._inflight = handle
        if not self._has_pending:
            other.zero_()
        if self.lam > 0 and self._prev_w is not None and self._now_w is not None:
            flat_params(self.params, self._now_w)
            if self._has_pending:
                # g + λ g ⊙ g ⊙ (w_t − w_{t−1})
                other.addcmul_(other * other, self._now_w - self._prev_w, value=self.lam)
            self._prev_w.copy_(self._now_w)
        set_grads(self.params, other)
        self._has_pending = True
        self._parity = 1 - self._parity
        self.steps += 1

    def drain(self) -> None:
        """Collective: finish the in-flight all-reduce (its average is applied next step)."""
        self._wait_inflight()

    def metrics(self) -> dict[str, float]:
        """Seconds the last step waited for the previous all-reduce, and the staleness (1)."""
        return {"exchange_wait_s": self._last_wait, "staleness": 1.0 if self.steps > 1 else 0.0}

    def exchange_state_dict(self) -> dict[str, Any]:
        """Collective: the averaged gradient still to be applied (identical on every rank)."""
        self.drain()
        pending = self._bufs[1 - self._parity].clone() if self._has_pending else None
        prev = self._prev_w.clone() if self._prev_w is not None else None
        return {"mode": "double-buffer", "steps": self.steps, "pending": pending, "prev_w": prev}

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Collective: restore the pending average saved by :meth:`exchange_state_dict`."""
        self.drain()
        self.steps = int(state["steps"])
        pending = state.get("pending")
        self._has_pending = pending is not None
        if pending is not None:
            self._bufs[1 - self._parity].copy_(pending)
        if self._prev_w is not None and state.get("prev_w") is not None:
            self._prev_w.copy_(state["prev_w"])

    def close(self) -> None:
        """Collective: finish communication, stop the helper thread, free the own communicator."""
        self.drain()
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._own_comm is not None:
            self._own_comm.Free()
            self._own_comm = None
        close_reducer(self.transport.reducer)  # its communication thread, if any


@dataclass(frozen=True)
class DoubleBufferOptions:
    """``--exchange double-buffer``'s options (TrainConfig fields of the same names)."""

    double_buffer_progress: str = "poll"
    delay_compensation: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DoubleBufferOptions:
        """Take the options from ``cfg`` (validated there)."""
        return cls(cfg.double_buffer_progress, cfg.delay_compensation)


def _build(ctx: BuildContext, opts: DoubleBufferOptions) -> DoubleBuffer:
    params = [p for p in ctx.module.parameters() if p.requires_grad]
    return DoubleBuffer(
        ctx.module,
        ctx.world.comm,
        progress=opts.double_buffer_progress,
        delay_compensation=opts.delay_compensation,
        transport=transport_for(ctx, params, overlap=True),
    )


#: the global batch the tuned defaults keep (per-rank batch = this / ranks, at least 8)
TUNED_GLOBAL_BATCH = 64


def _tuned(cfg: TrainConfig, ranks: int) -> dict[str, Any]:
    # One step of delay bounds the stable lr whatever the batch (docs/async.md: Nesterov
    # β = 0.9 is stable to lr·λ < 0.25, heavy ball to 0.1): no linear lr scaling, a fixed
    # lr at that bound, and a fixed global batch so that more ranks do not mean fewer steps.
    del cfg
    batch = max(8, TUNED_GLOBAL_BATCH // max(ranks, 1))
    return {"nesterov": True, "momentum": 0.9, "lr": 0.1, "scale_lr": False, "batch_size": batch}


SPEC = ModeSpec(
    name="double-buffer",
    options=DoubleBufferOptions.from_config,
    build=_build,
    lag=lambda _opts: 1,
    fields=("double_buffer_progress", "delay_compensation"),
    tuned=_tuned,
)
