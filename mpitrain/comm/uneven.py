"""Collectives whose ranks contribute different amounts: all-gather and reduce-scatter by counts.

(The block variants, equal counts on every rank, are in allgather.py and reduce_scatter.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm import reduce_ops
from mpitrain.comm.allreduce import numpy_view
from mpitrain.comm.handle import Handle, RequestHandle

if TYPE_CHECKING:
    from mpi4py import MPI


def iallgatherv_(
    send: torch.Tensor, out: torch.Tensor, counts: Sequence[int], comm: MPI.Intracomm
) -> Handle:
    """Collective: start gathering ``counts[r]`` elements from every rank r into ``out``.

    Tensors are contiguous on the host; ``out`` holds ``sum(counts)`` elements in rank order.
    """
    if out.numel() != sum(counts) or send.numel() != counts[comm.rank]:
        raise ValueError(f"allgatherv counts {list(counts)} do not match the tensors")
    sbuf = numpy_view(send)
    rbuf = [numpy_view(out), list(counts)]
    return RequestHandle(comm.Iallgatherv(sbuf, rbuf), keep=(sbuf, rbuf, send, out))


def ireduce_scatter_(
    send: torch.Tensor, out: torch.Tensor, counts: Sequence[int], comm: MPI.Intracomm,
    op: str = "sum",
) -> Handle:
    """Collective: reduce ``send`` (``sum(counts)`` elements) by ``op`` across ranks; rank r
    receives block r (``counts[r]`` elements) into ``out``. Returns the handle.
    """
    if send.numel() != sum(counts) or out.numel() != counts[comm.rank]:
        raise ValueError(f"reduce_scatter counts {list(counts)} do not match the tensors")
    sbuf: Any = reduce_ops.buffer(send)
    rbuf: Any = reduce_ops.buffer(out)
    mop = reduce_ops.mpi_op(op, send.dtype)
    req = comm.Ireduce_scatter(sbuf, rbuf, list(counts), op=mop)
    return RequestHandle(req, keep=(sbuf, rbuf, send, out))
