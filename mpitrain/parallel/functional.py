"""Autograd functions whose forward and backward issue the tensor-parallel collectives.

The pairs (forward <-> backward): identity <-> all-reduce (:func:`copy_to_tp`), all-reduce
<-> identity (:func:`reduce_from_tp`), all-gather <-> split (:func:`gather_from_tp`), and
for sequence parallelism all-gather <-> reduce-scatter along the sequence
(:func:`gather_sequence`, :func:`reduce_scatter_sequence`). CPU tensors go to MPI through
zero-copy views; device tensors are staged through host memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allgather import allgather_
from mpitrain.comm.allreduce import allreduce_
from mpitrain.comm.reduce_scatter import reduce_scatter_block_

if TYPE_CHECKING:
    from mpi4py import MPI


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor this module may write (a copy)."""
    return t.detach().to("cpu", copy=True).contiguous()


def allreduce_sum(t: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Collective: return the sum of ``t`` over ``comm`` (a new tensor on ``t``'s device)."""
    if comm.size == 1:
        return t
    h = _host(t)
    allreduce_(h, comm, average=False)
    return h.to(t.device)


def allgather_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    """Collective: concatenate every rank's ``t`` along ``dim`` (rank order)."""
    n = comm.size
    if n == 1:
        return t
    local = t.detach().movedim(dim, 0)
    full = torch.empty((n * local.shape[0], *local.shape[1:]), dtype=t.dtype)
    full[comm.rank * local.shape[0] : (comm.rank + 1) * local.shape[0]].copy_(local)
    allgather_(full.view(-1), comm)
    return full.movedim(0, dim).to(t.device)


def reduce_scatter_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    """Collective: sum ``t`` over ``comm`` and return this rank's chunk along ``dim``."""
    n = comm.size
    if n == 1:
        return t
    send = _host(t.movedim(dim, 0))
    chunk = send.shape[0] // n
    out = torch.empty((chunk, *send.shape[1:]), dtype=t.dtype)
    reduce_scatter_block_(send.view(-1), out.view(-1), comm, average=False)
    return out.movedim(0, dim).to(t.device)


def split_dim(t: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    """Return this rank's chunk of ``t`` along ``dim`` (no communication)."""
    if comm.size == 1:
        return t
    return t.chunk(comm.size, dim=dim)[comm.rank].contiguous()


def _identity(x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    return x.view_as(x)


def _sum(x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    return allreduce_sum(x, comm)


Op = Callable[[torch.Tensor, "MPI.Intracomm", int], torch.Tensor]


def _pair(forward: Op, backward: Op) -> Any:
    """An autograd Function running ``forward`` and, on the gradient, ``backward``."""

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
            ctx.comm, ctx.dim = comm, dim
            return forward(x, comm, dim)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            return backward(g.contiguous(), ctx.comm, ctx.dim), None, None

    return Pair


def _split(x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    return split_dim(x, comm, dim)


def _apply(fn: Any, x: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    out: torch.Tensor = fn.apply(x, comm, dim)
    return out


_CopyToTP = _pair(_identity, _sum)
_ReduceFromTP = _pair(_sum, _identity)
_GatherFromTP = _pair(allgather_dim, _split)
_ScatterToTP = _pair(_split, allgather_dim)
_ReduceScatter = _pair(reduce_scatter_dim, allgather_dim)
_GatherReduceScatter = _pair(allgather_dim, reduce_scatter_dim)


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
