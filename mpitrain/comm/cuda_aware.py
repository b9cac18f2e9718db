"""CUDA-aware path: device tensors go to MPI zero-copy once their producing work is complete.

mpi4py takes a torch CUDA tensor as a buffer through ``__cuda_array_interface__``/DLPack, so
no copy is made. MPI reads device memory outside any CUDA stream, so before the call the host
records an event on the tensor's compute stream and waits for that event only (never a
device-wide synchronize). Host tensors take the same code path through a numpy view, which is
how CI exercises it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.allreduce import sum_op
from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle
from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.comm.reducer import Reducer


def device_reducible(dtype: torch.dtype) -> bool:
    """Whether MPI can sum ``dtype`` on a device buffer (no Python user op involved).

    float16 and bfloat16 are summed by a Python user op that reads host memory
    (``torch.frombuffer``), so on a device they always go through host staging.
    """
    dt, _op = sum_op(dtype)
    return dt is None


def mpi_buffer(t: torch.Tensor) -> tuple[Any, Any]:
    """Return ``(buffer spec, op)`` for mpi4py: numpy view on the host, the tensor on a device."""
    if t.device.type == "cpu":
        return _ar.mpi_buffer(t)
    if not device_reducible(t.dtype):
        raise ConfigError(
            with_hint(
                f"{t.dtype} on {t.device} cannot be summed by MPI in device memory",
                "stage this dtype through host memory (make_reducer does this)",
            )
        )
    if not t.is_contiguous():
        raise ValueError("in-place collectives need a contiguous tensor; call .contiguous()")
    dtype, op = sum_op(t.dtype)
    dev = t.detach()
    return (dev if dtype is None else [dev, dtype]), op


#: divide in place by the number of ranks (floor division for integers), as FlatReducer does
average_ = _ar.average_


def wait_producer(t: torch.Tensor) -> None:
    """Block the host until the work queued so far on ``t``'s current stream is complete."""
    if t.device.type != "cuda":
        return
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record(torch.cuda.current_stream(t.device))
    done.synchronize()


class DirectReducer:
    """Flat all-reduce on one communicator that accepts host and (CUDA-aware MPI) device tensors."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm

    @property
    def size(self) -> int:
        """Number of ranks in the communicator."""
        return int(self.comm.size)

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an in-place sum/average of ``t`` (host or device memory)."""
        from mpi4py import MPI

        if self.comm.size == 1 or t.numel() == 0:
            return DONE
        buf, op = mpi_buffer(t)
        handle = RequestHandle(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=op), keep=buf)
        if not average:
            return handle
        n = self.comm.size
        return ChainedHandle(handle, lambda: average_(t, n))

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking in-place sum/average of ``t``."""
        self.iallreduce_(t, average=average).wait()


class CudaAwareReducer:
    """Hand device tensors to a device-capable reducer after their producing work completed.

    ``inner`` must accept device buffers (:class:`DirectReducer` or
    :class:`~mpitrain.comm.hierarchical.HierarchicalReducer`). Dtypes MPI cannot sum in device
    memory (bfloat16: needs a Python op) go to ``fallback`` (a staged reducer); every rank
    routes a given dtype the same way, so the order of collectives stays the same everywhere.
    """

    def __init__(self, inner: Reducer, *, fallback: Reducer | None = None) -> None:
        self.inner = inner
        self.fallback = fallback

    @property
    def size(self) -> int:
        """Number of ranks the reduction spans."""
        return self.inner.size

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: wait for ``t``'s producer event, then start the all-reduce on ``t``."""
        if t.device.type == "cuda" and not device_reducible(t.dtype):
            if self.fallback is None:
                raise ConfigError(
                    with_hint(
                        f"{t.dtype} cannot be reduced in device memory",
                        "build the reducer with make_reducer (adds a staged fallback)",
                    )
                )
            return self.fallback.iallreduce_(t, average=average)
        wait_producer(t)
        return self.inner.iallreduce_(t, average=average)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking in-place sum/average of ``t``."""
        self.iallreduce_(t, average=average).wait()
