"""Broadcast of torch tensors in place: zero-copy numpy views on the host.

Device tensors (CUDA) are staged through a host copy: broadcasts happen at wrap time, after a
resume and for BatchNorm-style buffers, where one extra copy is cheap and needs no CUDA-aware
MPI.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.allreduce import numpy_view

if TYPE_CHECKING:
    from mpi4py import MPI


def broadcast_(t: torch.Tensor, comm: MPI.Intracomm, root: int = 0) -> None:
    """Collective: overwrite ``t`` in place with ``root``'s values."""
    if comm.size == 1 or t.numel() == 0:
        return
    if t.device.type != "cpu":
        host = t.detach().to("cpu").contiguous()
        comm.Bcast(numpy_view(host), root=root)
        with torch.no_grad():
            t.copy_(host)
        return
    comm.Bcast(numpy_view(t), root=root)


def broadcast_tensors_(
    tensors: Iterable[torch.Tensor], comm: MPI.Intracomm, root: int = 0
) -> None:
    """Collective: broadcast many tensors in place, one message per dtype (coalesced).

    Every rank must pass tensors of the same shapes and dtypes in the same order.
    """
    if comm.size == 1:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.dtype, []).append(t)
    for dtype in sorted(groups, key=str):
        items = groups[dtype]
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in items])
            broadcast_(flat, comm, root)
            offset = 0
            for t in items:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n
