"""The transport under the gradient engine: a :class:`Reducer` sums a flat tensor across ranks.

The engine never talks to MPI itself; its hooks call ``state.reducer.iallreduce_(t, ...)``.
:class:`FlatReducer` (host tensors, one communicator) is the default; staged, CUDA-aware and
hierarchical reducers (mpitrain/comm/{staged,cuda_aware,hierarchical}.py) implement the same
protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.handle import DONE, Handle

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI


@runtime_checkable
class Reducer(Protocol):
    """Sum or average contiguous tensors in place across a fixed group of ranks.

    ``size`` is the number of ranks taking part (hooks use it to pre-scale before compressing).
    Every rank must start the same operations in the same order; results are visible in ``t``
    after the handle's ``wait()``. A reducer must accept float32/float64 and, where it can,
    float16/bfloat16 (sum in that precision).
    """

    @property
    def size(self) -> int:
        """Number of ranks the reduction spans."""
        ...

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an in-place sum (average when ``average``) of ``t``."""
        ...

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking in-place sum (average when ``average``) of ``t``."""
        ...


class FlatReducer:
    """The default reducer: host tensors, one communicator, one MPI call per tensor.

    ``overlap=False`` makes :meth:`iallreduce_` a blocking ``Allreduce`` returning a completed
    handle (for MPIs whose ``Iallreduce`` is slower than ``Allreduce``); ``None`` picks by
    library (see :func:`default_overlap`).
    """

    def __init__(self, comm: MPI.Intracomm, *, overlap: bool | None = None) -> None:
        self.comm = comm
        self.overlap = default_overlap() if overlap is None else overlap
        self._size = comm.size

    @property
    def size(self) -> int:
        """Number of ranks in the communicator."""
        return self._size

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an in-place sum/average of ``t`` (blocking when not overlapping)."""
        if not self.overlap:
            _ar.allreduce_(t, self.comm, average=average)
            return DONE
        return _ar.iallreduce_(t, self.comm, average=average)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking in-place sum/average of ``t``."""
        _ar.allreduce_(t, self.comm, average=average)


def default_overlap() -> bool:
    """Return whether non-blocking all-reduce pays on this MPI (measured: docs/engine.md).

    MPICH's ``Iallreduce`` costs the same as ``Allreduce``; Open MPI's was measured up to ~2×
    slower at 16-64 MB, so Open MPI defaults to blocking all-reduce at synchronize time.
    """
    from mpi4py import MPI

    vendor, _version = MPI.get_vendor()
    return vendor != "Open MPI"
