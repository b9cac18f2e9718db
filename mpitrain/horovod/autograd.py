"""Autograd through Horovod collectives, with Horovod's backward definitions.

allreduce: the gradient is all-reduced with the same op and scale factors. allgather: the
gradient is averaged across ranks and this rank's rows are returned. broadcast: the gradient
is averaged; ranks other than the root get zeros. alltoall: the gradient goes back through
alltoall with the received splits. reducescatter: the gradient is all-gathered (times the
set size for Sum, unchanged for Average, times the scale factors). Grouped variants do the
same per tensor.
The ``forward`` arguments are Horovod's (``horovod.torch.mpi_ops.HorovodAllreduce`` etc.).
"""

from __future__ import annotations

from typing import Any

import torch

from mpitrain.horovod import context as _c
from mpitrain.horovod import ops as _o


def call(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """Run ``fn.apply(*args)`` (typed wrapper)."""
    return fn.apply(*args)  # type: ignore[no-untyped-call]


def _ps(ps: Any) -> _c.ProcessSet:
    return _c.global_process_set if ps is None else ps


class HorovodAllreduce(torch.autograd.Function):
    """All-reduce whose backward all-reduces the gradient the same way."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, average: bool | None, name: str | None,
                op: int | None, pre: float, post: float, ps: Any) -> torch.Tensor:
        o = _o.op_of(op, average)
        ctx.args = (o, pre, post, ps)
        out: torch.Tensor = _o.allreduce_op([tensor], None, name, o, pre, post, ps,
                                            False, call=_o.WAIT).result()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        op, pre, post, ps = ctx.args
        g = call(HorovodAllreduce, grad.contiguous(), None, None, op, pre, post, ps)
        return g, None, None, None, None, None, None


class HorovodGroupedAllreduce(torch.autograd.Function):
    """Grouped all-reduce; backward is a grouped all-reduce of the gradients."""

    @staticmethod
    def forward(ctx: Any, average: bool | None, name: str | None, op: int | None, pre: float,
                post: float, ps: Any, *tensors: torch.Tensor) -> Any:
        o = _o.op_of(op, average)
        ctx.args = (o, pre, post, ps)
        return tuple(_o.allreduce_op(tensors, None, name, o, pre, post, ps, True,
                                     call=_o.WAIT).result())

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        op, pre, post, ps = ctx.args
        out = call(HorovodGroupedAllreduce, None, None, op, pre, post, ps,
                   *[g.contiguous() for g in grads])
        return (None, None, None, None, None, None, *out)


def _offsets(dims: list[int], ps: Any, grouped: bool) -> list[int]:
    """Collective: this rank's row offset in each gathered tensor (Horovod gathers dims)."""
    dim_t = torch.tensor([dims], dtype=torch.int64)
    every = _o.allgather_op([dim_t], None, ps, False, call=_o.WAIT).result()  # (size, dims)
    r = _ps(ps).rank() or 0
    return [int(every[:r, i].sum()) for i in range(len(dims))]


class HorovodAllgather(torch.autograd.Function):
    """All-gather; backward averages the gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, ps: Any) -> torch.Tensor:
        ctx.dim = tensor.shape[0] if tensor.dim() else 1
        ctx.ps = ps
        out: torch.Tensor = _o.allgather_op([tensor], name, ps, False, call=_o.WAIT).result()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        reduced = call(HorovodAllreduce, grad.contiguous(), None, None, _o.Average, 1.0, 1.0,
                       ctx.ps)
        off = _offsets([ctx.dim], ctx.ps, False)[0]
        return reduced.narrow(0, off, ctx.dim), None, None


class HorovodGroupedAllgather(torch.autograd.Function):
    """Grouped all-gather; backward as :class:`HorovodAllgather` per tensor."""

    @staticmethod
    def forward(ctx: Any, name: str | None, ps: Any, *tensors: torch.Tensor) -> Any:
        ctx.dims = [t.shape[0] if t.dim() else 1 for t in tensors]
        ctx.ps = ps
        return tuple(_o.allgather_op(tensors, name, ps, True, call=_o.WAIT).result())

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        reduced = call(HorovodGroupedAllreduce, None, None, _o.Average, 1.0, 1.0, ctx.ps,
                       *[g.contiguous() for g in grads])
        offs = _offsets(ctx.dims, ctx.ps, True)
        return (None, None, *[r.narrow(0, o, d)
                              for r, o, d in zip(reduced, offs, ctx.dims, strict=True)])


class HorovodBroadcast(torch.autograd.Function):
    """Broadcast; backward averages the gradient, zero on ranks other than the root."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: str | None,
                ps: Any) -> torch.Tensor:
        ctx.root, ctx.ps = root_rank, ps
        out: torch.Tensor = _o.broadcast_op(tensor, root_rank, name, ps, False,
                                            call=_o.WAIT).result()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        reduced = call(HorovodAllreduce, grad.contiguous(), None, None, _o.Average, 1.0, 1.0,
                       ctx.ps)
        if _c.context().world.rank != ctx.root:
            reduced = reduced * 0
        return reduced, None, None, None


class HorovodAlltoall(torch.autograd.Function):
    """All-to-all; backward sends the gradient back with the received splits."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any, name: str | None,
                ps: Any) -> Any:
        out, received = _o.alltoall_op(tensor, splits, name, ps, call=_o.WAIT).result()
        ctx.received, ctx.ps = received, ps
        if splits is None:
            return out
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_dead: Any) -> Any:
        back = call(HorovodAlltoall, grad.contiguous(), ctx.received, None, ctx.ps)
        return back[0], None, None, None


def _rs_scale(op: int, pre: float, post: float, ps: Any) -> float:
    """Return Horovod's factor on a reduce-scatter gradient: the set size for Sum, 1 for
    Average, times both scale factors (``HorovodReducescatter.backward``)."""
    return ((_ps(ps).size() or 1) if op == _o.Sum else 1.0) * pre * post


class HorovodReducescatter(torch.autograd.Function):
    """Reduce-scatter; backward all-gathers the gradient (scaled like the forward)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, op: int, ps: Any,
                pre: float, post: float) -> torch.Tensor:
        ctx.args = (op, pre, post, ps)
        out: torch.Tensor = _o.reducescatter_op([tensor], name, op, pre, post, ps,
                                                False, call=_o.WAIT).result()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        op, pre, post, ps = ctx.args
        g = call(HorovodAllgather, grad.contiguous(), None, ps) * _rs_scale(op, pre, post, ps)
        return g, None, None, None, None, None


class HorovodGroupedReducescatter(torch.autograd.Function):
    """Grouped reduce-scatter; backward as :class:`HorovodReducescatter` per tensor."""

    @staticmethod
    def forward(ctx: Any, name: str | None, op: int, ps: Any, pre: float, post: float,
                *tensors: torch.Tensor) -> Any:
        ctx.args = (op, pre, post, ps)
        return tuple(_o.reducescatter_op(tensors, name, op, pre, post, ps, True,
                                         call=_o.WAIT).result())

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        op, pre, post, ps = ctx.args
        gathered = call(HorovodGroupedAllgather, None, ps, *[g.contiguous() for g in grads])
        s = _rs_scale(op, pre, post, ps)
        return (None, None, None, None, None, *[g * s for g in gathered])
