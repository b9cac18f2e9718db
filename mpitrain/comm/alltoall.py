"""All-to-all of CPU torch tensors with per-rank counts (``MPI_Ialltoallv``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.allreduce import numpy_view
from mpitrain.comm.handle import Handle, RequestHandle

if TYPE_CHECKING:
    from mpi4py import MPI


def ialltoallv_(
    send: torch.Tensor,
    out: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    comm: MPI.Intracomm,
) -> Handle:
    """Collective: start sending ``send_counts[r]`` elements of ``send`` to rank r, in order,
    receiving ``recv_counts[r]`` elements from rank r into ``out``; returns the handle.

    Both tensors are contiguous on the host; counts are in elements.
    """
    if sum(send_counts) != send.numel() or sum(recv_counts) != out.numel():
        raise ValueError(
            f"alltoall counts {list(send_counts)}/{list(recv_counts)} do not match "
            f"{send.numel()}/{out.numel()} elements"
        )
    sbuf = [numpy_view(send), list(send_counts)]
    rbuf = [numpy_view(out), list(recv_counts)]
    return RequestHandle(comm.Ialltoallv(sbuf, rbuf), keep=(sbuf, rbuf, send, out))


def exchange_counts(counts: Sequence[int], comm: MPI.Intracomm) -> list[int]:
    """Collective: return what every rank sends to this one, given what it sends to each."""
    return [int(c) for c in comm.alltoall([int(c) for c in counts])]
