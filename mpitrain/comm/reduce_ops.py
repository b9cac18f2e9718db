"""Reduction ops for every dtype: sum, min, max and product, halves included.

MPI has native MIN/MAX/PROD for the integer and float types numpy maps; float16 and bfloat16
travel as int16 and are reduced by commutative user-defined ``MPI.Op``s computing in torch
(as :mod:`mpitrain.comm.allreduce` does for sums).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mpitrain.comm import allreduce as _ar

OPS = ("sum", "min", "max", "product")
_HALF = (torch.float16, torch.bfloat16)
# (op name, dtype) -> MPI.Op for the half types: user ops are created once per process
_USER_OPS: dict[tuple[str, torch.dtype], Any] = {}


def _half_op(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype
             ) -> Callable[[Any, Any, Any], None]:
    def op(inbuf: Any, inoutbuf: Any, _datatype: Any) -> None:
        a = torch.frombuffer(inbuf, dtype=dtype)
        b = torch.frombuffer(inoutbuf, dtype=dtype)
        b.copy_(fn(a, b))

    return op


_TORCH_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "min": torch.minimum,
    "max": torch.maximum,
    "product": torch.mul,
}


def mpi_op(name: str, dtype: torch.dtype) -> Any:
    """Return the ``MPI.Op`` reducing tensors of ``dtype`` by ``name`` (sum|min|max|product)."""
    from mpi4py import MPI

    if name == "sum":
        return _ar.sum_op(dtype)[1]
    if name not in _TORCH_FNS:
        raise ValueError(f"unknown reduction op {name!r}; use one of {OPS}")
    if dtype in _HALF:
        op = _USER_OPS.get((name, dtype))
        if op is None:
            op = MPI.Op.Create(_half_op(_TORCH_FNS[name], dtype), commute=True)
            _USER_OPS[(name, dtype)] = op
        return op
    if dtype == torch.bool:
        return {"min": MPI.LAND, "max": MPI.LOR, "product": MPI.LAND}[name]
    return {"min": MPI.MIN, "max": MPI.MAX, "product": MPI.PROD}[name]


def buffer(t: torch.Tensor) -> Any:
    """Return the mpi4py buffer spec of contiguous CPU ``t`` (halves typed as INT16_T)."""
    return _ar.mpi_buffer(t)[0]
