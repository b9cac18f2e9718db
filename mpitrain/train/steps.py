"""The loop's slot: how one step's micro-batches become gradients, losses and counts.

The :class:`~mpitrain.train.loop.Trainer` owns everything around a step — epochs, the sampler,
evaluation, metrics, the timeline, the watchdog, preemption, the per-step agreement and
checkpoints — and asks a :class:`Steps` only for what differs between kinds of parallelism,
as Megatron's ``get_forward_backward_func`` hands its loop one of several schedules:
:class:`ClassifierSteps` runs each micro-batch forward and backward through a data-parallel
exchange; :class:`mpitrain.train.grid.PipelineSteps` runs a tensor x pipeline grid's schedule.
The exchange's ``synchronize``/``step`` (gradients averaged, optimizer stepped) follow in the
loop for every kind.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.data.loader import Batch
    from mpitrain.grad.protocol import Exchange


@runtime_checkable
class Steps(Protocol):
    """What the loop's step and evaluation do on one rank (the slot of the one loop)."""

    #: per-rank sums (loss, samples, correct) added over this communicator are the global ones
    sum_comm: MPI.Intracomm
    #: ranks that train on different samples (the data-parallel size)
    replicas: int
    #: this rank's data-parallel index (its replica)
    replica: int
    #: whether this rank speaks for its replica (logs its samples): every rank of data
    #: parallelism, one rank (first stage, tensor rank 0) of a grid's replica
    lead: bool
    #: whether the correct counts mean anything (classification); False: loss only
    accuracy: bool

    def forward_backward(self, micro: list[Batch]) -> tuple[float, int]:
        """Forward and backward the step's micro-batches, gradients left for the exchange.

        Returns (the sum of this rank's per-sample losses, its correct predictions).
        """
        ...

    def eval_batch(self, batch: Batch) -> tuple[float, float, float]:
        """Forward only: (sum of per-sample losses, correct, samples) over the real samples."""
        ...

    def set_timeline(self, recorder: Timeline) -> None:
        """Record forward/backward spans into ``recorder`` (no communication)."""
        ...


def autocast_for(precision: str, device: torch.device) -> Any:
    """The autocast context of ``--precision`` (a null context for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class ClassifierSteps:
    """Data parallelism (sync, asynchronous modes, ZeRO): every micro-batch through the
    exchange, cross-entropy over the samples of the whole step; no_sync but on the last."""

    accuracy = True

    def __init__(self, model: Exchange, device: torch.device, comm: MPI.Intracomm, *,
                 precision: str = "fp32", scaler: Any = None) -> None:
        self.model, self.device, self.sum_comm = model, device, comm
        self.replicas, self.replica, self.lead = comm.size, comm.rank, True
        self.autocast = autocast_for(precision, device)
        self.scaler = scaler
        self.timeline: Timeline = NULL

    def set_timeline(self, recorder: Timeline) -> None:
        """Record forward/backward spans into ``recorder``."""
        self.timeline = recorder

    def forward_backward(self, micro: list[Batch]) -> tuple[float, int]:
        """Forward and backward each micro-batch (the exchange's no_sync on all but the last)."""
        model, dev, tl = self.model, self.device, self.timeline
        total = float(sum(int(b.mask.sum()) for b in micro))
        loss_value, correct = 0.0, 0
        for i, batch in enumerate(micro):
            x = batch.x.to(dev, non_blocking=True)
            y = batch.y.to(dev, non_blocking=True)
            mask = batch.mask.to(dev, non_blocking=True).to(torch.float32)
            sync = contextlib.nullcontext() if i == len(micro) - 1 else model.no_sync()
            with sync:
                t_tl = tl.now()
                with self.autocast:
                    logits = model(x)
                per_sample = F.cross_entropy(logits.float(), y, reduction="none")
                loss = (per_sample * mask).sum() / max(total, 1.0)
                tl.span("forward", t_tl)
                t_tl = tl.now()
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()  # type: ignore[no-untyped-call]
                tl.span("backward", t_tl)
            with torch.no_grad():
                correct += int(((logits.argmax(1) == y).float() * mask).sum())
            loss_value += float(loss.detach()) * max(total, 1.0)
        return loss_value, correct

    @torch.no_grad()
    def eval_batch(self, batch: Batch) -> tuple[float, float, float]:
        """Loss sum, correct and samples of the batch's real samples."""
        x, y = batch.x.to(self.device), batch.y.to(self.device)
        mask = batch.mask.to(self.device).to(torch.float64)
        with self.autocast:
            logits = self.model(x)
        per = F.cross_entropy(logits.float(), y, reduction="none").double()
        return (float((per * mask).sum()), float(((logits.argmax(1) == y).double() * mask).sum()),
                float(mask.sum()))
