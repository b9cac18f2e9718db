"""Run one pipeline stage through a schedule: micro-batches, backward, gradient reductions.

Every rank of the grid calls :meth:`PipelineEngine.train_step` with the same batch (the
first stage uses the inputs, the last the targets). After it returns, this rank's gradients
are complete: summed over micro-batches, averaged over the data-parallel group (the
existing engine: buckets, overlap, compression, on the last micro-batch's backward only),
summed over the stages that share tied parameters, and, under sequence parallelism, summed
over the tensor group for replicated parameters.

With a timeline (:meth:`PipelineEngine.set_timeline`) a step records each blocking receive as
a ``bubble`` span, the sends and receives as flights (:mod:`mpitrain.parallel.p2p`), every
tensor-parallel collective of the stage's forward and backward (inside
:func:`mpitrain.parallel.functional.recording`), the tied gradients' all-reduce and the loss
broadcast (``mpitrain/timeline/stages.py`` says what ``trace summary`` makes of them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpitrain.parallel.functional import recording
from mpitrain.parallel.p2p import StageLink
from mpitrain.parallel.schedule import Action, get_schedule
from mpitrain.parallel.tensor import sequence_parallel_grads_
from mpitrain.runtime.comm_thread import CommThread
from mpitrain.timeline.recorder import NULL, Timeline
from mpitrain.timeline.stages import PIPELINE

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.grad.protocol import Exchange
    from mpitrain.parallel.grid import Grid

StageFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class StepStats:
    """What the last step did on this stage (for logs and the benchmark)."""

    loss: float = 0.0
    peak_in_flight: int = 0
    peak_activation_bytes: int = 0
    step_seconds: float = 0.0
    wait_seconds: float = 0.0  # blocked in receives: the bubble as this stage saw it


class _SavedBytes:
    """Count the bytes autograd saves for backward, per micro-batch (parameters excluded)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.current = 0
        self.seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        # the parameters' storage now: ZeRO-3 gathers a block's weights into new storage
        skip = {p.untyped_storage().data_ptr() for p in self.params}
        if ptr not in skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.current += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def micro(self) -> Iterator[None]:
        self.current, self.seen = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


class PipelineEngine:
    """Drive this rank's stage of a pipeline (and its data-parallel replica).

    Args:
        stage: this stage's module, called ``stage(x, targets)``: the first stage takes the
            token batch, the others the previous stage's activation; the last stage returns
            the micro-batch's mean loss, the others their output activation.
        grid: the process grid (``pp_comm`` orders the stages).
        micro_batches: micro-batches per step (the batch's first dimension divides by it).
        schedule: ``1f1b`` or ``gpipe`` (:mod:`mpitrain.parallel.schedule`).
        data_parallel: the stage wrapped in a data-parallel exchange over ``grid.dp_comm``
            (:class:`mpitrain.grad.parallel.DataParallel`, or ZeRO's ``ShardedDataParallel``),
            or None when the data-parallel size is 1.
        tied: parameters this stage shares with another stage (gradients summed over
            ``grid.tied_comm``).
        sequence_parallel_params: replicated parameters whose gradients are partial per
            tensor rank (summed over ``grid.tp_comm``).
        measure_memory: count the activation bytes saved for backward (benchmark).
        progress: ``thread`` sends activations and gradients on a communication thread
            (``--comm-progress``; needs ``MPI_THREAD_MULTIPLE``), ``poll`` with ``Isend``.
    """

    def __init__(
        self, stage: nn.Module, grid: Grid, *, micro_batches: int, schedule: str = "1f1b",
        data_parallel: Exchange | None = None, tied: Sequence[nn.Parameter] = (),
        sequence_parallel_params: Sequence[nn.Parameter] = (),
        device: torch.device | None = None, measure_memory: bool = False,
        eval_through_exchange: bool = False, progress: str = "poll",
    ) -> None:
        self.stage, self.grid, self.micro = stage, grid, micro_batches
        self.actions: list[Action] = get_schedule(schedule)(
            grid.pp_rank, grid.pipeline, micro_batches
        )
        self.dp = data_parallel
        #: ``sum_shared(params, comm)``: Collective: sum those parameters' averaged gradients
        #: over ``comm`` where the exchange keeps them (ZeRO's shards); None: in ``.grad``
        self.sum_shared: Callable[[Sequence[nn.Parameter], MPI.Intracomm], None] | None = None
        #: evaluate through the exchange (ZeRO-3 gathers the parameters in its forward)
        self.eval_through_exchange = eval_through_exchange and data_parallel is not None
        self.tied = list(tied) if grid.tied_comm is not None else []
        self.sp_params = list(sequence_parallel_params)
        #: ``progress="thread"``: the sends run on one communication thread (in order)
        self.thread = CommThread(grid.comm.rank, "pipeline") if progress == "thread" else None
        self.link = StageLink(grid.pp_comm, device or torch.device("cpu"), thread=self.thread)
        self.eval_link = StageLink(grid.pp_comm, device or torch.device("cpu"),
                                   fixed_shapes=False, thread=self.thread)
        self.saved = _SavedBytes(list(stage.parameters())) if measure_memory else None
        self.stats = StepStats()
        self._checked = False
        #: records the bubble and the stage's traffic (:meth:`set_timeline`)
        self.timeline: Timeline = NULL

    def set_timeline(self, recorder: Timeline) -> None:
        """Record this stage's bubble, sends, receives and tensor-parallel collectives into
        ``recorder`` (no communication)."""
        self.timeline = self.link.timeline = self.eval_link.timeline = recorder
        if self.thread is not None:
            self.thread.timeline = recorder

    def close(self) -> None:
        """Finish the sends in flight; stop the communication thread (not collective)."""
        self.link.wait_sends()
        self.eval_link.wait_sends()
        if self.thread is not None:
            self.thread.close()

    def _check_batch(self, batch: torch.Tensor | None) -> None:
        """Collective (pipeline): refuse a batch that does not split into equal micro-batches
        on every stage that sees it (one rank's error would leave a neighbour in a receive)."""
        from mpitrain.errors import ConfigError, with_hint
        from mpitrain.runtime.collective import agree

        def check() -> None:
            if batch is not None and len(batch) % self.micro:
                raise ConfigError(with_hint(
                    f"a batch of {len(batch)} does not split into {self.micro} equal "
                    "micro-batches", "pass batches of a multiple of micro_batches"))

        agree(self.grid.pp_comm, check)
        self._checked = True

    def _call(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        fn: Any = self.dp if self.dp is not None else self.stage
        return fn(x, target)  # type: ignore[no-any-return]

    def _recv(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        t0, t_tl = time.perf_counter(), self.timeline.now()
        out = fn()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.timeline.span("pipeline wait", t_tl, cat="bubble",
                           args={"stage": self.grid.pp_rank})
        return out

    def _forward(
        self, i: int, xs: Sequence[torch.Tensor] | None, ts: Sequence[torch.Tensor] | None,
        store: dict[int, tuple[torch.Tensor | None, torch.Tensor, int]],
    ) -> None:
        g = self.grid
        x: torch.Tensor
        if g.first_stage:
            assert xs is not None
            x, inp = xs[i], None
        else:
            x = inp = self._recv(self.link.recv_forward).requires_grad_(True)
        target = ts[i] if g.last_stage and ts is not None else None
        ctx = self.saved.micro() if self.saved is not None else contextlib.nullcontext()
        with ctx:
            out = self._call(x, target)
        nbytes = self.saved.current if self.saved is not None else 0
        store[i] = (inp, out, nbytes)
        if not g.last_stage:
            self.link.send_forward(out)

    def _backward(
        self, i: int, store: dict[int, tuple[torch.Tensor | None, torch.Tensor, int]],
        last: bool, scale: float = 1.0,
    ) -> float:
        inp, out, _ = store.pop(i)
        sync = contextlib.nullcontext() if last or self.dp is None else self.dp.no_sync()
        with sync:
            if self.grid.last_stage:
                (out * (scale / self.micro)).backward()  # type: ignore[no-untyped-call]
            else:
                torch.autograd.backward(out, self._recv(self.link.recv_backward))
        if inp is not None:
            assert inp.grad is not None
            self.link.send_backward(inp.grad)
        return float(out.detach()) if self.grid.last_stage else 0.0

    def train_step(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *,
        loss_scale: float = 1.0, last: bool = True,
    ) -> float:
        """Collective (grid): forward and backward one batch; returns its mean loss.

        The loss is the mean over micro-batches of the last stage's loss, sent to every
        stage. Gradients are left in ``.grad`` (not zeroed here), scaled by ``loss_scale``.
        ``last=False`` (gradient accumulation): gradients stay local — no data-parallel,
        tied or sequence-parallel reduction until the call with ``last=True``.
        """
        if not self._checked:  # once: every stage agrees the batch splits into micro-batches
            self._check_batch(inputs if inputs is not None else targets)
        with recording(self.timeline):
            return self._train_step(inputs, targets, loss_scale, last)

    def _train_step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                    loss_scale: float, last: bool) -> float:
        """Collective (grid): :meth:`train_step`'s schedule, reductions and loss."""
        t0 = time.perf_counter()
        self.stats = StepStats()
        xs = inputs.chunk(self.micro) if inputs is not None else None
        ts = targets.chunk(self.micro) if targets is not None else None
        store: dict[int, tuple[torch.Tensor | None, torch.Tensor, int]] = {}
        total, live, peak_bytes = 0.0, 0, 0
        backwards = sum(1 for a in self.actions if a.kind == "B")
        done = 0
        for a in self.actions:
            if a.kind == "F":
                self._forward(a.micro, xs, ts, store)
                live = len(store)
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, live)
                peak_bytes = max(peak_bytes, sum(s[2] for s in store.values()))
            else:
                done += 1
                total += self._backward(a.micro, store, last and done == backwards,
                                        loss_scale)
        self.link.wait_sends()
        if last:
            if self.dp is not None:
                self.dp.synchronize()
            self._reduce_shared()
        loss = self._loss_bcast(total / self.micro)
        self.stats.loss = float(loss)
        self.stats.peak_activation_bytes = peak_bytes
        self.stats.step_seconds = time.perf_counter() - t0
        return self.stats.loss

    def _loss_bcast(self, loss: float) -> float:
        """Collective (pipeline): the last stage's loss on every stage."""
        tl = self.timeline
        t0 = tl.now() if tl.on else 0
        out = float(self.grid.pp_comm.bcast(loss, root=self.grid.pipeline - 1))
        if tl.on:
            tl.comm_blocking("broadcast loss", 8, t0, "broadcast", {"group": PIPELINE})
        return out

    def _reduce_shared(self) -> None:
        from mpitrain.comm.allreduce import allreduce_

        if self.sum_shared is not None:  # the gradients live in the exchange's shards (ZeRO)
            if self.sp_params:
                self.sum_shared(self.sp_params, self.grid.tp_comm)
            if self.tied and self.grid.tied_comm is not None:
                self.sum_shared(self.tied, self.grid.tied_comm)
            return
        if self.sp_params:
            sequence_parallel_grads_(self.sp_params, self.grid.tp_comm)
        if self.tied and self.grid.tied_comm is not None:
            tl = self.timeline
            t0 = tl.now() if tl.on else 0
            for p in self.tied:
                if p.grad is not None:
                    allreduce_(p.grad, self.grid.tied_comm, average=False)
            if tl.on:
                nbytes = sum(p.grad.numel() * p.grad.element_size()
                             for p in self.tied if p.grad is not None)
                tl.comm_blocking("allreduce tied grads", nbytes, t0, "allreduce",
                                 {"group": "tied", "ranks": self.grid.tied_comm.size})

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Collective (grid): the batch's mean loss, forward only, on every stage.

        Every stage passes the batch (its length sets the micro-batches; a last partial
        batch is fine here: shapes travel with each message).
        """
        g, link = self.grid, self.eval_link
        total = 0.0
        with recording(self.timeline):
            for x, t in zip(inputs.chunk(self.micro), targets.chunk(self.micro), strict=True):
                h = x if g.first_stage else link.recv_forward()
                fn: Any = self.dp if self.eval_through_exchange else self.stage
                out = fn(h, t if g.last_stage else None)
                if g.last_stage:
                    total += float(out) * len(t)
                else:
                    link.send_forward(out)
        link.wait_sends()
        return self._loss_bcast(total / len(targets))
