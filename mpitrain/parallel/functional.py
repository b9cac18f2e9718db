"""Autograd functions whose forward and backward issue the tensor-parallel collectives.

The pairs (forward <-> backward): identity <-> all-reduce (:func:`copy_to_tp`), all-reduce
<-> identity (:func:`reduce_from_tp`), all-gather <-> split (:func:`gather_from_tp`), and
for sequence parallelism all-gather <-> reduce-scatter along the sequence
(:func:`gather_sequence`, :func:`reduce_scatter_sequence`). CPU tensors go to MPI through
zero-copy views; device tensors are staged through host memory.

Inside ``with recording(tl):`` (the pipeline engine's step) every collective here is recorded
into ``tl`` as a blocking named flight (``tp all-reduce fwd``, ``tp all-gather bwd`` ...,
``args.group == "tensor"``, ``args.ranks``): a model calls these functions with its
communicator only, and the engine that runs it scopes the recording. A backward collective
records into the timeline its forward saw (autograd may run the backward on another thread).
Outside, or while ``tl`` is off, nothing is recorded: one context-variable read per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allgather import allgather_
from mpitrain.comm.allreduce import allreduce_
from mpitrain.comm.reduce_scatter import reduce_scatter_block_
from mpitrain.timeline.recorder import NULL, Timeline
from mpitrain.timeline.stages import TENSOR

if TYPE_CHECKING:
    from mpi4py import MPI

#: the timeline the tensor-parallel collectives record into: set by :func:`recording` only
_TIMELINE: ContextVar[Timeline] = ContextVar("mpitrain_tensor_parallel_timeline", default=NULL)


@contextlib.contextmanager
def recording(tl: Timeline) -> Iterator[None]:
    """Record the tensor-parallel collectives issued inside the block (and the backward of
    what its forward built) into ``tl``."""
    token = _TIMELINE.set(tl)
    try:
        yield
    finally:
        _TIMELINE.reset(token)


def current_timeline() -> Timeline:
    """The timeline set by the innermost :func:`recording` (the null recorder outside)."""
    return _TIMELINE.get()


def record_since(tl: Timeline, name: str, op: str, nbytes: int, comm: MPI.Intracomm,
                 t0: int) -> None:
    """Record a blocking tensor-group collective that ran from ``t0`` to now (call it only
    when ``tl.on``)."""
    tl.comm_blocking(name, nbytes, t0, op, {"group": TENSOR, "ranks": comm.size})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor this module may write (a copy)."""
    return t.detach().to("cpu", copy=True).contiguous()


def allreduce_sum(t: torch.Tensor, comm: MPI.Intracomm, *, tl: Timeline = NULL,
                  name: str = "tp all-reduce") -> torch.Tensor:
    """Collective: return the sum of ``t`` over ``comm`` (a new tensor on ``t``'s device),
    recorded into ``tl`` as ``name`` while it is on."""
    if comm.size == 1:
        return t
    t0 = tl.now() if tl.on else 0
    h = _host(t)
    allreduce_(h, comm, average=False)
    out = h.to(t.device)
    if tl.on:
        record_since(tl, name, "allreduce", _nbytes(h), comm, t0)
    return out


def allgather_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int, *, tl: Timeline = NULL,
                  name: str = "tp all-gather") -> torch.Tensor:
    """Collective: concatenate every rank's ``t`` along ``dim`` (rank order), recorded into
    ``tl`` as ``name`` (the gathered bytes) while it is on."""
    n = comm.size
    if n == 1:
        return t
    t0 = tl.now() if tl.on else 0
    local = t.detach().movedim(dim, 0)
    full = torch.empty((n * local.shape[0], *local.shape[1:]), dtype=t.dtype)
    full[comm.rank * local.shape[0] : (comm.rank + 1) * local.shape[0]].copy_(local)
    allgather_(full.view(-1), comm)
    out = full.movedim(0, dim).to(t.device)
    if tl.on:
        record_since(tl, name, "all-gather", _nbytes(full), comm, t0)
    return out


def reduce_scatter_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int, *, tl: Timeline = NULL,
                       name: str = "tp reduce-scatter") -> torch.Tensor:
    """Collective: sum ``t`` over ``comm`` and return this rank's chunk along ``dim``,
    recorded into ``tl`` as ``name`` (the reduced bytes) while it is on."""
    n = comm.size
    if n == 1:
        return t
    t0 = tl.now() if tl.on else 0
    send = _host(t.movedim(dim, 0))
    chunk = send.shape[0] // n
    out = torch.empty((chunk, *send.shape[1:]), dtype=t.dtype)
    reduce_scatter_block_(send.view(-1), out.view(-1), comm, average=False)
    result = out.movedim(0, dim).to(t.device)
    if tl.on:
        record_since(tl, name, "reduce-scatter", _nbytes(send), comm, t0)
    return result


def split_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    """Return this rank's chunk of ``t`` along ``dim`` (no communication)."""
    if comm.size == 1:
        return t
    return t.chunk(comm.size, dim=dim)[comm.rank].contiguous()


#: an op of a pair: (tensor, comm, dim, timeline, "fwd" or "bwd") -> tensor
Op = Callable[[torch.Tensor, "MPI.Intracomm", int, Timeline, str], torch.Tensor]


def _identity(x: torch.Tensor, comm: MPI.Intracomm, dim: int, tl: Timeline, way: str
              ) -> torch.Tensor:
    return x.view_as(x)


def _sum(x: torch.Tensor, comm: MPI.Intracomm, dim: int, tl: Timeline, way: str
         ) -> torch.Tensor:
    return allreduce_sum(x, comm, tl=tl, name=f"tp all-reduce {way}")


def _gather(x: torch.Tensor, comm: MPI.Intracomm, dim: int, tl: Timeline, way: str
            ) -> torch.Tensor:
    return allgather_dim(x, comm, dim, tl=tl, name=f"tp all-gather {way}")


def _scatter(x: torch.Tensor, comm: MPI.Intracomm, dim: int, tl: Timeline, way: str
             ) -> torch.Tensor:
    return reduce_scatter_dim(x, comm, dim, tl=tl, name=f"tp reduce-scatter {way}")


def _split(x: torch.Tensor, comm: MPI.Intracomm, dim: int, tl: Timeline, way: str
           ) -> torch.Tensor:
    return split_dim(x, comm, dim)


def _pair(forward: Op, backward: Op) -> Any:
    """An autograd Function running ``forward`` and, on the gradient, ``backward``; both
    record into the timeline current at the forward."""

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
            ctx.comm, ctx.dim, ctx.tl = comm, dim, _TIMELINE.get()
            return forward(x, comm, dim, ctx.tl, "fwd")

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            return backward(g.contiguous(), ctx.comm, ctx.dim, ctx.tl, "bwd"), None, None

    return Pair


def _apply(fn: Any, x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    out: torch.Tensor = fn.apply(x, comm, dim)
    return out


_CopyToTP = _pair(_identity, _sum)
_ReduceFromTP = _pair(_sum, _identity)
_GatherFromTP = _pair(_gather, _split)
_ScatterToTP = _pair(_split, _gather)
_ReduceScatter = _pair(_scatter, _gather)
_GatherReduceScatter = _pair(_gather, _scatter)


def copy_to_tp(x: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Collective in backward: identity forward, gradient all-reduced over ``comm``."""
    return x if comm.size == 1 else _apply(_CopyToTP, x, comm, 0)


def reduce_from_tp(x: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Collective: sum the partial results over ``comm``; identity backward."""
    return x if comm.size == 1 else _apply(_ReduceFromTP, x, comm, 0)


def gather_from_tp(x: torch.Tensor, comm: MPI.Intracomm, dim: int = -1) -> torch.Tensor:
    """Collective: concatenate the slices along ``dim``; backward keeps this rank's slice."""
    if comm.size == 1:
        return x
    return _apply(_GatherFromTP, x, comm, dim % x.dim())


def scatter_to_tp(x: torch.Tensor, comm: MPI.Intracomm, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice along ``dim``; backward all-gathers (collective)."""
    if comm.size == 1:
        return x
    return _apply(_ScatterToTP, x, comm, dim % x.dim())


def gather_sequence(x: torch.Tensor, comm: MPI.Intracomm, dim: int = 1) -> torch.Tensor:
    """Collective: all-gather along the sequence forward, reduce-scatter backward."""
    if comm.size == 1:
        return x
    return _apply(_GatherReduceScatter, x, comm, dim)


def reduce_scatter_sequence(x: torch.Tensor, comm: MPI.Intracomm, dim: int = 1) -> torch.Tensor:
    """Collective: reduce-scatter along the sequence forward, all-gather backward."""
    if comm.size == 1:
        return x
    return _apply(_ReduceScatter, x, comm, dim)
