"""``bench parallel``'s helpers: memory counters, and the run through torch's own pipelining.

``torch_pp_run`` drives the same ``GPTStage`` modules (one per rank) with
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
    """A DTensor's local shard (other tensors as they are)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


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


def torch_pp_run(a: argparse.Namespace, comm: MPI.Intracomm, schedule: str) -> Run:
    """Collective: one GPT stage per rank driven by ``torch.distributed.pipelining`` (gloo)."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.nn import functional as F

    from mpitrain.comm.allreduce import allreduce_
    from mpitrain.train.gpt import GPTStage

    init_gloo(comm)
    rank, n = comm.rank, comm.size
    tp = cast("MPI.Intracomm", comm.Split(rank, 0))  # a tensor group of one
    gpt = GPTStage(gpt_config(a, False), tp, rank, n)
    split = comm.Split(0 if rank in (0, n - 1) else MPI.UNDEFINED, rank)
    ends = None if split == MPI.COMM_NULL else cast("MPI.Intracomm", split)

    class Logits(nn.Module):
        """The last stage up to the logits: torch's schedule applies the loss itself."""

        def __init__(self, inner: GPTStage) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for block in self.inner.blocks.values():
                h = block(h)
            return F.linear(self.inner.ln_f(h), self.inner.head.weight)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten().long())

    module: nn.Module = Logits(gpt) if rank == n - 1 else gpt
    stage = PipelineStage(module, rank, n, torch.device("cpu"))
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = kind(stage, n_microbatches=a.micro_batches, loss_fn=loss_fn)
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
    params = list(gpt.parameters())

    def train(tokens: torch.Tensor) -> tuple[float, int, float]:
        live = LiveSaved(gpt)
        losses: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
            if rank == 0:
                sched.step(tokens[:, :-1])
            elif rank == n - 1:
                sched.step(target=tokens[:, 1:], losses=losses)
            else:
                sched.step()
        if ends is not None:
            for p in gpt.tied_parameters():
                assert p.grad is not None
                allreduce_(p.grad, ends, average=False)
        loss = sum(float(v) for v in losses) / len(losses) if losses else math.nan
        return math.nan, live.peak, loss

    def update() -> None:
        opt.step()
        opt.zero_grad()

    def close() -> None:
        dist.destroy_process_group()
        tp.Free()
        if ends is not None:
            ends.Free()

    describe = f"torch.distributed.pipelining: {n} stages, one per rank, gloo over TCP"
    return Run(train, update, lambda: model_memory(params, opt), describe, close)


def gpt_config(a: argparse.Namespace, sequence_parallel: bool) -> Any:
    """The model every method trains."""
    from mpitrain.train.gpt import GPTConfig

    return GPTConfig(context=a.context, dim=a.dim, heads=a.heads, layers=a.layers,
                     sequence_parallel=sequence_parallel, seed=0)
