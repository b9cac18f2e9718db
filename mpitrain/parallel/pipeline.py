"""Run one pipeline stage through a schedule: micro-batches, backward, gradient reductions.

Every rank of the grid calls :meth:`PipelineEngine.train_step` with the same batch (the
first stage uses the inputs, the last the targets). After it returns, this rank's gradients
are complete: summed over micro-batches, averaged over the data-parallel group (the
existing engine: buckets, overlap, compression, on the last micro-batch's backward only),
summed over the stages that share tied parameters, and, under sequence parallelism, summed
over the tensor group for replicated parameters.

Several model chunks per rank (virtual stages, the ``interleaved`` schedule): pass a
:class:`mpitrain.parallel.chunks.StageChunks` (chunk ``c`` is global stage ``c * P + s``);
the first global stage is rank 0's chunk 0, the last (the loss) the last rank's last chunk.

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
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mpitrain.parallel.chunks import StageChunks
from mpitrain.parallel.functional import recording
from mpitrain.parallel.p2p import CHUNK_TAGS, StageLink
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
#: the activations a step holds: (chunk, micro-batch) -> (input, output, saved bytes)
Store = dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, int]]


@dataclass
class StepStats:
    """What the last step did on this stage (for logs and the benchmark)."""

    loss: float = 0.0
    #: most (chunk, micro-batch) activations held at once (one chunk: micro-batches)
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
            the micro-batch's mean loss, the others their output activation. Or this rank's
            chunks (a :class:`StageChunks`, or a sequence the engine puts in one), each
            called the same way; their count is the virtual stages ``v``.
        grid: the process grid (``pp_comm`` orders the stages).
        micro_batches: micro-batches per step (the batch's first dimension divides by it).
        schedule: ``1f1b``, ``gpipe`` or ``interleaved`` (:mod:`mpitrain.parallel.schedule`;
            ``interleaved`` with one chunk is ``1f1b``).
        data_parallel: the stage wrapped in a data-parallel exchange over ``grid.dp_comm``
            (:class:`mpitrain.grad.parallel.DataParallel`, or ZeRO's ``ShardedDataParallel``),
            or None when the data-parallel size is 1. With chunks it wraps the
            :class:`StageChunks` passed as ``stage`` (called ``dp(x, targets, chunk=c)``).
        tied: parameters this stage shares with another stage (gradients summed over
            ``grid.tied_comm``; with chunks, ``StageChunks.tied_parameters()``).
        sequence_parallel_params: replicated parameters whose gradients are partial per
            tensor rank (summed over ``grid.tp_comm``).
        measure_memory: count the activation bytes saved for backward (benchmark).
        progress: ``thread`` sends activations and gradients on a communication thread
            (``--comm-progress``; needs ``MPI_THREAD_MULTIPLE``), ``poll`` with ``Isend``.
    """

    def __init__(
        self, stage: nn.Module | Sequence[nn.Module], grid: Grid, *, micro_batches: int,
        schedule: str = "1f1b",
        data_parallel: Exchange | None = None, tied: Sequence[nn.Parameter] = (),
        sequence_parallel_params: Sequence[nn.Parameter] = (),
        device: torch.device | None = None, measure_memory: bool = False,
        eval_through_exchange: bool = False, progress: str = "poll",
    ) -> None:
        chunked = isinstance(stage, nn.ModuleList) or not isinstance(stage, nn.Module)
        #: this rank's chunks in global-stage order (one: the stage itself)
        self.chunks: list[nn.Module] = list(cast("Sequence[nn.Module]", stage)) if chunked \
            else [cast("nn.Module", stage)]
        self.stage: nn.Module = self.chunks[0] if not chunked else \
            stage if isinstance(stage, StageChunks) else StageChunks(self.chunks)
        self.virtual, self.chunked = len(self.chunks), chunked
        self._check_chunks(grid, chunked and data_parallel is not None
                           and not isinstance(stage, StageChunks))
        self.grid, self.micro = grid, micro_batches
        self.actions: list[Action] = get_schedule(schedule, self.virtual)(
            grid.pp_rank, grid.pipeline, micro_batches
        )
        #: action indices whose backward is the step's last of its chunk (the exchange's
        #: reduction runs there: each chunk's buckets start once its gradients are final)
        self._final = {max(k for k, a in enumerate(self.actions) if a.kind == "B" and
                           a.chunk == c) for c in range(self.virtual)}
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
        self.saved = _SavedBytes(list(self.stage.parameters())) if measure_memory else None
        self.stats = StepStats()
        self._checked = False
        #: records the bubble and the stage's traffic (:meth:`set_timeline`)
        self.timeline: Timeline = NULL

    def _check_chunks(self, grid: Grid, unwrapped: bool) -> None:
        """Refuse chunks the engine cannot route (not collective: every rank alike)."""
        from mpitrain.errors import ConfigError, with_hint

        v = self.virtual
        if v < 1:
            raise ConfigError(with_hint("the pipeline stage has no chunks",
                                        "pass a module, or one module per virtual stage"))
        if v > 1 and grid.pipeline == 1:
            raise ConfigError(with_hint(
                f"{v} chunks on a pipeline of one stage: virtual stages interleave the "
                "chunks of several pipeline ranks", "use pipeline stages > 1, or one chunk"))
        if v * CHUNK_TAGS + 2 * CHUNK_TAGS > 32767:  # the tag bound MPI guarantees
            raise ConfigError(with_hint(f"{v} chunks per rank are too many for MPI's tags",
                                        f"use at most {32767 // CHUNK_TAGS - 2} virtual stages"))
        if unwrapped:
            raise ConfigError(with_hint(
                "a data-parallel exchange with a plain list of chunks: it must wrap the "
                "container the engine calls", "put the chunks in a StageChunks, wrap that "
                "in the exchange and pass the same StageChunks as the stage"))

    def _first(self, chunk: int) -> bool:
        """Whether ``chunk`` of this rank is the first global stage (takes the inputs)."""
        return chunk == 0 and self.grid.first_stage

    def _last(self, chunk: int) -> bool:
        """Whether ``chunk`` of this rank is the last global stage (the loss)."""
        return chunk == self.virtual - 1 and self.grid.last_stage

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

    def _call(self, x: torch.Tensor, target: torch.Tensor | None, chunk: int,
              through_exchange: bool = True) -> torch.Tensor:
        if self.dp is None or not through_exchange:
            return self.chunks[chunk](x, target)  # type: ignore[no-any-return]
        fn: Any = self.dp
        if self.chunked:  # the exchange wraps the StageChunks: it picks the chunk
            return fn(x, target, chunk=chunk)  # type: ignore[no-any-return]
        return fn(x, target)  # type: ignore[no-any-return]

    def _recv(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        t0, t_tl = time.perf_counter(), self.timeline.now()
        out = fn()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.timeline.span("pipeline wait", t_tl, cat="bubble",
                           args={"stage": self.grid.pp_rank})
        return out

    def _forward(
        self, i: int, c: int, xs: Sequence[torch.Tensor] | None,
        ts: Sequence[torch.Tensor] | None, store: Store,
    ) -> None:
        x: torch.Tensor
        if self._first(c):
            assert xs is not None
            x, inp = xs[i], None
        else:
            x = inp = self._recv(lambda: self.link.recv_forward(c)).requires_grad_(True)
        target = ts[i] if self._last(c) and ts is not None else None
        ctx = self.saved.micro() if self.saved is not None else contextlib.nullcontext()
        with ctx:
            out = self._call(x, target, c)
        nbytes = self.saved.current if self.saved is not None else 0
        store[(c, i)] = (inp, out, nbytes)
        if not self._last(c):
            self.link.send_forward(out, c)

    def _backward(self, i: int, c: int, store: Store, last: bool, scale: float = 1.0) -> float:
        inp, out, _ = store.pop((c, i))
        sync = contextlib.nullcontext() if last or self.dp is None else self.dp.no_sync()
        with sync:
            if self._last(c):
                (out * (scale / self.micro)).backward()  # type: ignore[no-untyped-call]
            else:
                torch.autograd.backward(out, self._recv(lambda: self.link.recv_backward(c)))
        if inp is not None:
            assert inp.grad is not None
            self.link.send_backward(inp.grad, c)
        return float(out.detach()) if self._last(c) else 0.0

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
        store: Store = {}
        total, peak_bytes = 0.0, 0
        for k, a in enumerate(self.actions):
            if a.kind == "F":
                self._forward(a.micro, a.chunk, xs, ts, store)
                self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(store))
                peak_bytes = max(peak_bytes, sum(s[2] for s in store.values()))
            else:
                total += self._backward(a.micro, a.chunk, store, last and k in self._final,
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
        batch is fine here: shapes travel with each message). With chunks, every
        micro-batch through chunk 0, then through chunk 1, ...
        """
        link = self.eval_link
        total = 0.0
        xs, ts = inputs.chunk(self.micro), targets.chunk(self.micro)
        with recording(self.timeline):
            for c in range(self.virtual):
                for x, t in zip(xs, ts, strict=True):
                    h = x if self._first(c) else link.recv_forward(c)
                    out = self._call(h, t if self._last(c) else None, c,
                                     self.eval_through_exchange)
                    if self._last(c):
                        total += float(out) * len(t)
                    else:
                        link.send_forward(out, c)
        link.wait_sends()
        return self._loss_bcast(total / len(targets))
