"""``bench parallel``'s helpers: memory counters, and the run through torch's own pipelining.

``torch_pp_run`` drives the same stage modules of the registry's model (built by its spec
with a tensor group of one; one per rank, or ``v`` per rank interleaved) with
``torch.distributed.pipelining`` over gloo, side by side with mpitrain's engine.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mpitrain.bench.allreduce import init_gloo

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI
    from torch import nn


def local(t: Any) -> Any:
    """A DTensor's local shard, the tensor an ``AsyncCollectiveTensor`` (a functional
    collective's result, storage-less) waits for; other tensors as they are."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.trigger_wait() if isinstance(t, AsyncCollectiveTensor) else t  # type: ignore[no-untyped-call]


def _storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (gradient views of buckets count once;
    a DTensor counts its local shard)."""
    import torch

    seen: dict[int, int] = {}
    for t in tensors:
        t = local(t)
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def model_memory(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (call before zero_grad)."""
    state = [v for st in opt.state.values() for v in st.values()]
    return {"parameters": _storage_bytes(params),
            "gradients": _storage_bytes(p.grad for p in params),
            "optimizer": _storage_bytes(state)}


class _Held:
    """A saved tensor; releasing it (autograd dropping the saved value) updates the count."""

    __slots__ = ("nbytes", "owner", "ptr", "t")

    def __init__(self, t: torch.Tensor, owner: LiveSaved, ptr: int, nbytes: int) -> None:
        self.t, self.owner, self.ptr, self.nbytes = t, owner, ptr, nbytes

    def __del__(self) -> None:
        self.owner.release(self.ptr, self.nbytes)


class LiveSaved:
    """Peak bytes of tensors saved for backward alive at once (``module``'s parameters excluded,
    the ones registered when the tensor is saved: FSDP2's gathered parameters too)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.skip = self._params()
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def _params(self) -> set[int]:
        return {local(p).untyped_storage().data_ptr() for p in self.module.parameters()}

    def pack(self, t: torch.Tensor) -> Any:
        storage = local(t).untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or ptr == 0:
            return t
        self.skip = self._params()  # the parameters may have been swapped (FSDP2's unshard)
        if ptr in self.skip:
            return t
        if not self.refs.get(ptr):
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        return _Held(t, self, ptr, storage.nbytes())

    def release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes

    @staticmethod
    def unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h  # type: ignore[no-any-return]


@dataclass
class Run:
    """One rank's training step, split where the model state is counted."""

    train: Callable[[torch.Tensor], tuple[float, int, float]]  # -> (bubble share,
    # activation bytes, the mean loss of this rank's replica or NaN where it has none)
    update: Callable[[], None]
    memory: Callable[[], dict[str, int]]
    describe: str
    close: Callable[[], None]


def logits_module(stage: nn.Module) -> nn.Module:
    """The last stage up to the logits (torch's schedules apply the loss themselves): a
    ``SpecStage`` runs its spec's forward, the built-in ``GPTStage`` its blocks, norm and head."""
    from torch import nn
    from torch.nn import functional as F

    from mpitrain.parallel.spec import SpecStage

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            inner: Any = self.inner
            if isinstance(inner, SpecStage):
                return inner.spec.forward(inner, h)
            for block in inner.blocks.values():
                h = block(h)
            return F.linear(inner.ln_f(h), inner.head.weight)

    return Logits(stage)


def torch_pp_run(a: argparse.Namespace, comm: MPI.Intracomm, schedule: str,
                 virtual: int = 1) -> Run:
    """Collective: the registry model's stages, one per rank (``virtual`` per rank, interleaved:
    global stage ``c * n + rank``), driven by ``torch.distributed.pipelining`` over gloo."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch import nn
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )
    from torch.nn import functional as F

    from mpitrain.bench.parallel_engine import bench_spec
    from mpitrain.comm.allreduce import allreduce_

    init_gloo(comm)
    rank, n = comm.rank, comm.size
    tp = cast("MPI.Intracomm", comm.Split(rank, 0))  # a tensor group of one
    spec, cpu, total = bench_spec(a), torch.device("cpu"), n * virtual
    chunks: list[Any] = [spec.build_stage(tp, c * n + rank, total, cpu) for c in range(virtual)]
    split = comm.Split(0 if rank in (0, n - 1) else MPI.UNDEFINED, rank)
    ends = None if split == MPI.COMM_NULL else cast("MPI.Intracomm", split)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().long())

    stages: list[Any] = [PipelineStage(logits_module(m) if c * n + rank == total - 1 else m,
                            c * n + rank, total, cpu) for c, m in enumerate(chunks)]
    if virtual > 1:
        sched: Any = ScheduleInterleaved1F1B(stages, n_microbatches=a.micro_batches,
                                             loss_fn=loss_fn)
    else:
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = kind(stages[0], n_microbatches=a.micro_batches, loss_fn=loss_fn)
    held = nn.ModuleList(chunks)
    opt = torch.optim.AdamW(held.parameters(), lr=1e-4)
    params = list(held.parameters())
    tied = [p for m in chunks for p in m.tied_parameters()]

    def train(tokens: torch.Tensor) -> tuple[float, int, float]:
        live = LiveSaved(held)
        losses: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
            if rank == 0:
                sched.step(tokens[:, :-1])
            elif rank == n - 1:
                sched.step(target=tokens[:, 1:], losses=losses)
            else:
                sched.step()
        if ends is not None:
            for p in tied:
                assert p.grad is not None
                allreduce_(p.grad, ends, average=False)
        loss = sum(float(v.detach()) for v in losses) / len(losses) if losses else math.nan
        return math.nan, live.peak, loss

    def update() -> None:
        opt.step()
        opt.zero_grad()

    def close() -> None:
        dist.destroy_process_group()
        tp.Free()
        if ends is not None:
            ends.Free()

    kind_name = "ScheduleInterleaved1F1B" if virtual > 1 else \
        "ScheduleGPipe" if schedule == "gpipe" else "Schedule1F1B"
    describe = (f"torch.distributed.pipelining: {total} stages, {virtual} per rank "
                f"({kind_name}), gloo over TCP")
    return Run(train, update, lambda: model_memory(params, opt), describe, close)


def gpt_config(a: argparse.Namespace, sequence_parallel: bool) -> Any:
    """The model every method trains."""
    from mpitrain.train.gpt import GPTConfig

    return GPTConfig(context=a.context, dim=a.dim, heads=a.heads, layers=a.layers,
                     sequence_parallel=sequence_parallel, seed=0)
