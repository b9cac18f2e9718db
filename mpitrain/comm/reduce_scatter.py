"""Reduce-scatter of flat torch tensors, zero-copy (host: numpy views; CUDA: CUDA-aware MPI).

``reduce_scatter_block`` semantics: every rank passes a flat tensor of ``size * chunk``
elements; rank ``r`` receives the sum (or average) of everyone's ``[r*chunk, (r+1)*chunk)``.
Callers pad to a multiple of the communicator size (``mpitrain.grad.zero.layout`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.cuda_aware import mpi_buffer, wait_producer
from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle

if TYPE_CHECKING:
    from mpi4py import MPI


def check_chunk(send: torch.Tensor, out: torch.Tensor | None, size: int,
                what: str = "reduce-scatter") -> int:
    """Return the chunk per rank of ``send`` (ValueError when sizes do not fit)."""
    if send.numel() % size:
        raise ValueError(
            f"{what} buffer of {send.numel()} elements does not divide by {size} ranks; "
            "pad it to a multiple of the communicator size"
        )
    chunk = send.numel() // size
    if out is not None and out.numel() != chunk:
        raise ValueError(f"reduce-scatter output holds {out.numel()} elements, need {chunk}")
    return chunk


def trivial(send: torch.Tensor, out: torch.Tensor | None, size: int) -> bool:
    """One rank or empty chunks: nothing to send (``out`` gets ``send``). True if so."""
    if size > 1 and send.numel():
        return False
    if out is not None:
        out.copy_(send)
    return True


def ireduce_scatter_block_(
    send: torch.Tensor, out: torch.Tensor | None, comm: MPI.Intracomm, *, average: bool = True
) -> Handle:
    """Collective: start reducing ``send`` so this rank's chunk lands in ``out``.

    With ``out=None`` the reduction runs in place (``MPI_IN_PLACE``) and this rank's result
    lands in ``send[:chunk]`` (the rest of ``send`` is undefined afterwards). Do not touch the
    buffers before ``handle.wait()``.
    """
    size = comm.size
    chunk = check_chunk(send, out, size)
    target = send[:chunk] if out is None else out
    if trivial(send, out, size):
        return DONE
    wait_producer(send)  # a CUDA tensor: MPI reads it outside the stream
    sbuf, op = mpi_buffer(send)
    if out is None:
        req = comm.Ireduce_scatter_block(_ar.in_place(), sbuf, op=op)
        keep: object = sbuf
    else:
        rbuf, _ = mpi_buffer(out)
        req = comm.Ireduce_scatter_block(sbuf, rbuf, op=op)
        keep = (sbuf, rbuf)
    handle = RequestHandle(req, keep=keep)
    if not average:
        return handle
    return ChainedHandle(handle, lambda: _ar.average_(target, size))


def reduce_scatter_block_(
    send: torch.Tensor, out: torch.Tensor | None, comm: MPI.Intracomm, *, average: bool = True
) -> None:
    """Collective: blocking :func:`ireduce_scatter_block_`."""
    ireduce_scatter_block_(send, out, comm, average=average).wait()
