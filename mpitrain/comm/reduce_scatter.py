"""Reduce-scatter of flat CPU torch tensors through zero-copy numpy views.

``reduce_scatter_block`` semantics: every rank passes a flat tensor of ``size * chunk``
elements; rank ``r`` receives the sum (or average) of everyone's ``[r*chunk, (r+1)*chunk)``.
Callers pad to a multiple of the communicator size (``mpitrain.grad.zero.layout`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle

if TYPE_CHECKING:
    from mpi4py import MPI


def _check(send: torch.Tensor, out: torch.Tensor | None, size: int) -> int:
    if send.numel() % size:
        raise ValueError(
            f"reduce-scatter input of {send.numel()} elements does not divide by {size} ranks; "
            "pad it to a multiple of the communicator size"
        )
    chunk = send.numel() // size
    if out is not None and out.numel() != chunk:
        raise ValueError(f"reduce-scatter output holds {out.numel()} elements, need {chunk}")
    return chunk


def ireduce_scatter_block_(
    send: torch.Tensor, out: torch.Tensor | None, comm: MPI.Intracomm, *, average: bool = True
) -> Handle:
    """Collective: start reducing ``send`` so this rank's chunk lands in ``out``.

    With ``out=None`` the reduction runs in place (``MPI_IN_PLACE``) and this rank's result
    lands in ``send[:chunk]`` (the rest of ``send`` is undefined afterwards). Do not touch the
    buffers before ``handle.wait()``.
    """
    size = comm.size
    chunk = _check(send, out, size)
    target = send[:chunk] if out is None else out
    if size == 1:
        if out is not None:
            out.copy_(send)
        return DONE
    if chunk == 0:
        return DONE
    sbuf, op = _ar.mpi_buffer(send)
    if out is None:
        req = comm.Ireduce_scatter_block(_ar.in_place(), sbuf, op=op)
        keep: object = sbuf
    else:
        rbuf, _ = _ar.mpi_buffer(out)
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
