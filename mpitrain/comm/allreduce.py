"""All-reduce of CPU torch tensors in place, through a zero-copy numpy view.

Passing a tensor straight to mpi4py goes through DLPack (about 8 µs more per call); a numpy
view of the same storage costs about 1 µs. float16 uses MPICH's native ``MPIX_C_FLOAT16`` when
the library has it, bfloat16 (and float16 elsewhere) a commutative user-defined ``MPI.Op`` that
adds in torch (correctly rounded). Integer averages use floor division.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle
from mpitrain.errors import DeviceError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

_HALF = (torch.float16, torch.bfloat16)
_OPS: dict[torch.dtype, Any] = {}


def _half_sum(dtype: torch.dtype) -> Any:
    def op(inbuf: Any, inoutbuf: Any, _datatype: Any) -> None:
        a = torch.frombuffer(inbuf, dtype=dtype)
        b = torch.frombuffer(inoutbuf, dtype=dtype)
        b.add_(a)

    return op


def sum_op(dtype: torch.dtype) -> tuple[MPI.Datatype | None, MPI.Op]:
    """Return (explicit datatype or None, sum op) for reducing tensors of ``dtype``."""
    from mpi4py import MPI

    if dtype not in _HALF:
        return None, MPI.SUM
    if dtype == torch.float16 and MPI.FLOAT16_T != MPI.DATATYPE_NULL:
        return MPI.FLOAT16_T, MPI.SUM
    op = _OPS.get(dtype)
    if op is None:
        op = _OPS[dtype] = MPI.Op.Create(_half_sum(dtype), commute=True)
    return MPI.INT16_T, op


def numpy_view(t: torch.Tensor) -> Any:
    """Return a numpy array sharing ``t``'s storage (half types viewed as int16, bool as uint8)."""
    if t.device.type != "cpu":
        raise DeviceError(
            with_hint(
                f"host all-reduce got a {t.device} tensor",
                "wrap the reducer in mpitrain.comm.staged.StagedReducer or use a CUDA-aware one",
            )
        )
    if not t.is_contiguous():
        raise ValueError("in-place collectives need a contiguous tensor; call .contiguous()")
    if t.requires_grad:
        t = t.detach()
    if t.dtype in _HALF:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.numpy()


_DIVISORS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _average(t: torch.Tensor, n: int) -> None:
    # a cached 0-dim divisor: dividing by a Python int would allocate a scalar tensor per call
    key = (n, t.dtype, t.device)
    d = _DIVISORS.get(key)
    if d is None:
        d = _DIVISORS[key] = torch.tensor(n, dtype=t.dtype, device=t.device)
    if t.is_floating_point() or t.is_complex():
        t.div_(d)
    else:
        t.floor_divide_(d)


def allreduce_(t: torch.Tensor, comm: MPI.Intracomm, *, average: bool = True) -> None:
    """Collective: sum (or average) ``t`` in place across ``comm`` (blocking)."""
    from mpi4py import MPI

    if comm.size == 1 or t.numel() == 0:
        return
    dtype, op = sum_op(t.dtype)
    arr = numpy_view(t)
    comm.Allreduce(MPI.IN_PLACE, arr if dtype is None else [arr, dtype], op=op)
    if average:
        _average(t, comm.size)


def iallreduce_(t: torch.Tensor, comm: MPI.Intracomm, *, average: bool = True) -> Handle:
    """Collective: start summing (or averaging) ``t`` in place; returns the caller's handle.

    Do not read or write ``t`` until ``handle.wait()`` returns.
    """
    from mpi4py import MPI

    if comm.size == 1 or t.numel() == 0:
        return DONE
    dtype, op = sum_op(t.dtype)
    arr = numpy_view(t)
    req = comm.Iallreduce(MPI.IN_PLACE, arr if dtype is None else [arr, dtype], op=op)
    handle = RequestHandle(req, keep=arr)
    if not average:
        return handle
    n = comm.size
    return ChainedHandle(handle, lambda: _average(t, n))
