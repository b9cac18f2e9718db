"""A reference reducer that sums in another order, for equivalence tests that must not compare
rounding noise.

An equivalence test passes only if its tolerance holds for any summation order a conforming MPI
or BLAS may use. :class:`OtherOrderReducer` sums the ranks' contributions in reverse rank order
after nudging each by one ulp (as another BLAS kernel might): a reference trained through it must
match the usual reference within the test's tolerance. A parameter whose true gradient is zero
(a Linear bias in front of BatchNorm) under Adam fails this check on 4 ranks, as it did on
AVX-512 machines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mpitrain.comm.handle import DONE, Handle

if TYPE_CHECKING:
    from mpi4py import MPI


class OtherOrderReducer:
    """Collective reducer: all-gather, nudge by one ulp, sum from the last rank to the first."""

    overlap = False

    def __init__(self, comm: MPI.Intracomm, seed: int = 0) -> None:
        self.comm = comm
        self._gen = torch.Generator().manual_seed(seed + comm.rank)

    @property
    def size(self) -> int:
        """Number of ranks."""
        return int(self.comm.size)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: in-place sum (or average) of ``t`` in reverse rank order."""
        flat = t.detach().reshape(-1)
        mine = flat.clone()
        if flat.dtype in (torch.float32, torch.float64):  # half types: the order only
            sign = torch.randint(0, 2, flat.shape, generator=self._gen).to(flat.dtype) * 2 - 1
            mine = torch.where(flat == 0, flat, torch.nextafter(flat, flat + sign * flat.abs()))
        parts = torch.empty((self.size, flat.numel()), dtype=flat.dtype)
        bits = torch.int16 if flat.element_size() == 2 else flat.dtype  # numpy has no bf16
        self.comm.Allgather(mine.view(bits).numpy(), parts.view(bits).numpy())
        acc = parts[-1].clone()
        for i in range(self.size - 2, -1, -1):
            acc += parts[i]
        if average:
            acc /= self.size
        flat.copy_(acc)

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: the blocking sum, returned as a completed handle."""
        self.allreduce_(t, average=average)
        return DONE
