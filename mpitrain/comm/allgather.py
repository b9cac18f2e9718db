"""All-gather of flat CPU torch tensors in place, through zero-copy numpy views.

Every rank passes the same flat tensor of ``size * chunk`` elements whose chunk
``[rank*chunk, (rank+1)*chunk)`` holds its contribution; afterwards every chunk holds its
owner's values (``MPI_IN_PLACE``: no send buffer, no copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.handle import DONE, Handle, RequestHandle

if TYPE_CHECKING:
    from mpi4py import MPI


def iallgather_(full: torch.Tensor, comm: MPI.Intracomm) -> Handle:
    """Collective: start filling every rank's chunk of ``full`` from its owner (in place)."""
    size = comm.size
    if full.numel() % size:
        raise ValueError(
            f"all-gather buffer of {full.numel()} elements does not divide by {size} ranks; "
            "pad it to a multiple of the communicator size"
        )
    if size == 1 or full.numel() == 0:
        return DONE
    buf = _ar.numpy_view(full)
    return RequestHandle(comm.Iallgather(_ar.in_place(), buf), keep=buf)


def allgather_(full: torch.Tensor, comm: MPI.Intracomm) -> None:
    """Collective: blocking :func:`iallgather_`."""
    iallgather_(full, comm).wait()
