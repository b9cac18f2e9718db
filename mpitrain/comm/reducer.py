"""The transport under the gradient engine: a :class:`Reducer` sums a flat tensor across ranks.

The engine never talks to MPI itself; its hooks call ``state.reducer.iallreduce_(t, ...)``.
:class:`FlatReducer` (host tensors, one communicator) is the default; staged, CUDA-aware and
hierarchical reducers (mpitrain/comm/{staged,cuda_aware,hierarchical}.py) implement the same
protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle

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

    #: tensors whose MPI buffer spec is remembered (bucket buffers are long-lived)
    CACHE_SIZE = 256

    def __init__(self, comm: MPI.Intracomm, *, overlap: bool | None = None) -> None:
        self.comm = comm
        self.overlap = default_overlap() if overlap is None else overlap
        self._size = comm.size
        # id(t) -> (t, buffer spec, op); holding t keeps the id from being reused
        self._specs: dict[int, tuple[torch.Tensor, Any, Any]] = {}
        self._in_place = _ar.in_place()

    def _buffer(self, t: torch.Tensor) -> tuple[Any, Any]:
        hit = self._specs.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1], hit[2]
        if len(self._specs) >= self.CACHE_SIZE:
            self._specs.clear()
        buf, op = _ar.mpi_buffer(t)
        self._specs[id(t)] = (t, buf, op)
        return buf, op

    @property
    def size(self) -> int:
        """Number of ranks in the communicator."""
        return self._size

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an in-place sum/average of ``t`` (blocking when not overlapping)."""
        if not self.overlap:
            self.allreduce_(t, average=average)
            return DONE
        if self._size == 1 or t.numel() == 0:
            return DONE
        buf, op = self._buffer(t)
        handle = RequestHandle(self.comm.Iallreduce(self._in_place, buf, op=op), keep=buf)
        if not average:
            return handle
        n = self._size
        return ChainedHandle(handle, lambda: _ar.average_(t, n))

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking in-place sum/average of ``t``."""
        if self._size == 1 or t.numel() == 0:
            return
        buf, op = self._buffer(t)
        self.comm.Allreduce(self._in_place, buf, op=op)
        if average:
            _ar.average_(t, self._size)


#: MPI libraries whose non-blocking all-reduce was measured (docs/engine.md)
MEASURED_VENDORS = ("MPICH", "Open MPI")


def overlap_measured() -> bool:
    """Whether :func:`default_overlap` rests on a measurement of this MPI library."""
    from mpi4py import MPI

    return MPI.get_vendor()[0] in MEASURED_VENDORS


def default_overlap() -> bool:
    """Return whether non-blocking all-reduce pays on this MPI (measured: docs/engine.md).

    MPICH's ``Iallreduce`` costs the same as ``Allreduce``; Open MPI's was measured up to ~2×
    slower at 16-64 MB, so Open MPI defaults to blocking all-reduce at synchronize time.
    """
    from mpi4py import MPI

    vendor, _version = MPI.get_vendor()
    return vendor != "Open MPI"
