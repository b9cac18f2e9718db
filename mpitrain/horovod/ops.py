"""The data movement behind each Horovod collective, after :mod:`negotiate` agreed on it.

Every function here returns an :class:`~mpitrain.horovod.handles.Op` the caller owns (the
public ``*_async`` functions number it in the handle table; blocking ones just wait), made
by :mod:`mpitrain.horovod.engine`; ``call`` says how the caller goes on (``ASYNC``: an
``*_async`` call, ``WAIT``: it waits at once, ``STEP``: a ``DistributedOptimizer``
bucket). Copies of inputs (out-of-place all-reduce and broadcast, device tensors, prescaled
reduce-scatters) are made at the call; other inputs are read by the transfer, which the
engine may run later on its thread (as with Horovod, leave them alone until synchronize).
Tensors on a device are staged through host copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm import reduce_ops
from mpitrain.comm.alltoall import ialltoallv_
from mpitrain.comm.handle import DONE, Handle, MultiHandle, RequestHandle
from mpitrain.comm.uneven import iallgatherv_, ireduce_scatter_
from mpitrain.horovod import context as _c
from mpitrain.horovod import engine as _e
from mpitrain.horovod.engine import NOT_CONTIGUOUS, UNSUPPORTED, Outcome, Start
from mpitrain.horovod.handles import Op
from mpitrain.horovod.negotiate import Request

if TYPE_CHECKING:
    from mpi4py import MPI

Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
ASYNC, WAIT, STEP = _e.ASYNC, _e.WAIT, _e.STEP  # how the caller goes on (engine docstring)
OP_NAMES = {Average: "average", Sum: "sum", Adasum: "adasum", Min: "min", Max: "max",
            Product: "product"}
REDUCIBLE = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
             torch.bfloat16, torch.float32, torch.float64)
MOVABLE = (*REDUCIBLE, torch.bool)


def op_of(op: Any, average: bool | None) -> int:
    """Return Horovod's op for ``op``/``average`` (``average`` is the deprecated spelling)."""
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if op is None:
        return Average if average is None or average else Sum
    if op not in OP_NAMES:
        raise ValueError(f"unknown reduction op {op!r}; use hvd.Average, Sum, Min, Max, Product")
    return int(op)


def argument_error(msg: str) -> ValueError:
    """Return Horovod's InvalidArgument error, raised on the calling rank before any exchange.

    Horovod raises these at enqueue time (``ThrowIfError`` turns them into ValueError), so
    no collective is issued and the peers are left in none; ranks that all pass the same
    bad argument all raise at once.
    """
    return ValueError(f"rank {_c.context().world.rank}: {msg}")


def check_tensors(ts: Sequence[Any], what: str, dtypes: Sequence[torch.dtype] = MOVABLE,
                  in_place: bool = False) -> str | None:
    """Return Horovod's complaint about tensors its collectives do not take, or None.

    The complaint is agreed like any request, so every rank raises it (a ValueError).
    """
    for t in ts:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"hvd.{what} takes torch tensors, got {type(t).__name__}")
    for t in ts:
        if t.dtype not in dtypes:
            return f"Tensor type {t.dtype} {UNSUPPORTED}{what}."
        if in_place and not t.is_contiguous():
            return NOT_CONTIGUOUS
    return None


def host(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` itself on the host when contiguous there, else a contiguous host copy."""
    t = t.detach()
    return t if t.is_cpu and t.is_contiguous() else t.to("cpu").contiguous()


def scale_(t: torch.Tensor, factor: float) -> None:
    """Multiply in place like Horovod's ScaleBuffer (integers: truncated toward zero)."""
    if factor == 1.0:
        return
    if t.is_floating_point():
        t.mul_(factor)
    else:
        t.copy_(torch.trunc(t.to(torch.float64) * factor))


def finish_reduce_(t: torch.Tensor, op: str, size: int, post: float) -> None:
    """Apply Horovod's postscale (``post / size`` for Average: joined ranks count in size)."""
    if op != "average":
        scale_(t, post)
    elif post == 1.0 and t.is_floating_point():
        t.div_(size)
    elif post == 1.0:
        t.copy_(torch.div(t, size, rounding_mode="trunc"))
    else:
        scale_(t, post / size)


def submit(ps: Any, req: Request, start: Start, local_error: str | None = None,
           call: str = ASYNC) -> Op:
    """Collective over ``ps``: agree on ``req``, then ``start`` the data movement (the
    context's :class:`~mpitrain.horovod.engine.Engine`; see there for what raises at once).
    """
    return _c.context().engine.submit(ps, req, start, local_error, call=call)


def start_allreduce(comm: MPI.Intracomm, out: torch.Tensor, op: str, pre: float,
                    post: float) -> Handle:
    """Collective: start reducing host tensor ``out`` in place (pre-scaled now)."""
    scale_(out, pre)
    if comm.size == 1 or out.numel() == 0:
        return DONE
    buf = reduce_ops.buffer(out)
    mop = reduce_ops.mpi_op("sum" if op == "average" else op, out.dtype)
    return RequestHandle(comm.Iallreduce(_ar.in_place(), buf, op=mop), keep=(buf, out))


def allreduce_op(tensors: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] | None,
                 name: str | None, op: int, pre: float, post: float, ps: Any,
                 grouped: bool, call: str = ASYNC) -> Op:
    """Collective: (grouped) all-reduce into ``outs`` (None: new tensors)."""
    kind = "grouped_allreduce" if grouped else "allreduce"
    err = check_tensors(tensors, kind, REDUCIBLE, in_place=outs is not None)
    if op == Adasum:
        raise NotImplementedError(
            "hvd.Adasum is not provided by mpitrain.horovod (it needs Horovod's Adasum "
            "reduction tree); use hvd.Average or hvd.Sum (see docs/migrating-from-horovod.md)"
        )
    opname = OP_NAMES[op]
    req = Request(kind, name, tuple(str(t.dtype) for t in tensors),
                  tuple(tuple(t.shape) for t in tensors), opname, None, float(pre), float(post))
    bufs = [host(t).clone() if outs is None else host(t) for t in tensors]

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        handles = [start_allreduce(comm, b, opname, pre, post) for b in bufs]
        size = comm.size

        def finish() -> Any:
            results = []
            for t, b in zip(tensors, bufs, strict=True):
                finish_reduce_(b, opname, size, post)
                if outs is None:
                    results.append(b.to(t.device))
                    continue
                if b.data_ptr() != t.data_ptr():
                    with torch.no_grad():
                        t.copy_(b)
                results.append(t)
            return results if grouped else results[0]

        return MultiHandle(handles), finish

    return submit(ps, req, start, err, call)


def join_contribute(comm: MPI.Intracomm, req: Request) -> None:
    """Collective: take part in an active rank's all-reduce with zeros (a joined rank)."""
    zeros = [torch.zeros(s, dtype=getattr(torch, d.split(".")[-1]))
             for d, s in zip(req.dtypes, req.shapes, strict=True)]
    for z in zeros:
        start_allreduce(comm, z, req.op or "sum", 1.0, 1.0).wait()


def _dim0s(comm: MPI.Intracomm, tensors: Sequence[torch.Tensor]) -> np.ndarray:
    mine = np.array([t.shape[0] for t in tensors], dtype=np.int64)
    every = np.empty((comm.size, len(tensors)), dtype=np.int64)
    comm.Allgather(mine, every)
    return every


def allgather_op(tensors: Sequence[torch.Tensor], name: str | None, ps: Any,
                 grouped: bool, call: str = ASYNC) -> Op:
    """Collective: (grouped) all-gather along dim 0 into new tensors."""
    kind = "grouped_allgather" if grouped else "allgather"
    err = check_tensors(tensors, kind)
    req = Request(kind, name, tuple(str(t.dtype) for t in tensors),
                  tuple(tuple(t.shape) if t.dim() else (1,) for t in tensors))
    srcs = [host(t).reshape(-1, *t.shape[1:]) if t.dim() else host(t).reshape(1)
            for t in tensors]

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        every = _dim0s(comm, srcs)
        outs, handles = [], []
        for i, s in enumerate(srcs):
            row = int(np.prod(s.shape[1:], dtype=np.int64))
            counts = [int(every[r, i]) * row for r in range(comm.size)]
            out = torch.empty((int(every[:, i].sum()), *s.shape[1:]), dtype=s.dtype)
            handles.append(iallgatherv_(s, out, counts, comm))
            outs.append(out)

        def finish() -> Any:
            results = [o.to(t.device) for o, t in zip(outs, tensors, strict=True)]
            return results if grouped else results[0]

        return MultiHandle(handles), finish

    return submit(ps, req, start, err, call)


def root_index(ps: Any, root_rank: int) -> tuple[int, str | None]:
    """Return the index of global ``root_rank`` in ``ps`` (Horovod roots are global ranks)."""
    ranks = (ps or _c.global_process_set).ranks or []
    if root_rank not in ranks:
        return 0, f"root rank {root_rank} is not in the process set (ranks {ranks})"
    return ranks.index(root_rank), None


def broadcast_op(tensor: torch.Tensor, root_rank: int, name: str | None, ps: Any,
                 in_place: bool, call: str = ASYNC) -> Op:
    """Collective: broadcast ``tensor`` from global rank ``root_rank``."""
    bad = check_tensors([tensor], "broadcast", in_place=in_place)
    _c.context().comm_of(ps, "hvd.broadcast")  # membership first, as Horovod checks
    root, err = root_index(ps, int(root_rank))
    if err is not None:
        raise argument_error(err)
    err = bad
    req = Request("broadcast", name, (str(tensor.dtype),), (tuple(tensor.shape),),
                  root=int(root_rank))
    buf = host(tensor)
    if not in_place and buf.data_ptr() == tensor.data_ptr():
        buf = buf.clone()

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        h: Handle = DONE
        if comm.size > 1 and buf.numel():
            arr = _ar.numpy_view(buf)
            h = RequestHandle(comm.Ibcast(arr, root=root), keep=(arr, buf))

        def finish() -> torch.Tensor:
            if in_place:
                if buf.data_ptr() != tensor.data_ptr():
                    with torch.no_grad():
                        tensor.copy_(buf)
                return tensor
            return buf.to(tensor.device)

        return h, finish

    return submit(ps, req, start, err, call)


def even_splits(dim0: int, size: int) -> list[int]:
    """Return Horovod's reducescatter split of ``dim0`` rows (the first ranks get one more)."""
    return [dim0 // size + (1 if r < dim0 % size else 0) for r in range(size)]


def _splits_error(splits: Any, dim0: int, size: int) -> tuple[list[int], str | None]:
    if splits is None:
        if dim0 % size:
            return [], (f"alltoall: the first dimension ({dim0}) is not divisible by the "
                        f"number of ranks ({size}); pass splits=")
        return [dim0 // size] * size, None
    values = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    if len(values) != size or any(v < 0 for v in values) or sum(values) != dim0:
        return [], (f"alltoall: splits {values} must be {size} non-negative counts summing "
                    f"to the first dimension ({dim0})")
    return values, None


def alltoall_op(tensor: torch.Tensor, splits: Any, name: str | None, ps: Any,
                call: str = ASYNC) -> Op:
    """Collective: scatter slices of dim 0 to every rank; result is (output, received)."""
    bad = check_tensors([tensor], "alltoall")
    size = (ps or _c.global_process_set).size() or 1
    dim0 = tensor.shape[0] if tensor.dim() else 1
    _c.context().comm_of(ps, "hvd.alltoall")  # membership first, as Horovod checks
    sends, err = _splits_error(splits, dim0, size)
    if err is not None:
        raise argument_error(err)
    err = bad
    req = Request("alltoall", name, (str(tensor.dtype),), (tuple(tensor.shape) or (1,),),
                  splits=splits is not None)
    split_dtype = splits.dtype if isinstance(splits, torch.Tensor) else torch.int32
    src = host(tensor).reshape(dim0, *tensor.shape[1:])

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        send = np.array(sends, dtype=np.int64)
        recv = np.empty(comm.size, dtype=np.int64)
        comm.Alltoall(send, recv)
        row = int(np.prod(src.shape[1:], dtype=np.int64))
        out = torch.empty((int(recv.sum()), *src.shape[1:]), dtype=src.dtype)
        h = ialltoallv_(src, out, [s * row for s in sends], [int(r) * row for r in recv], comm)

        def finish() -> tuple[torch.Tensor, torch.Tensor]:
            return out.to(tensor.device), torch.from_numpy(recv).to(split_dtype)

        return h, finish

    return submit(ps, req, start, err, call)


def reducescatter_op(tensors: Sequence[torch.Tensor], name: str | None, op: int, pre: float,
                     post: float, ps: Any, grouped: bool, call: str = ASYNC) -> Op:
    """Collective: (grouped) reduce-scatter along dim 0 (Sum or Average)."""
    kind = "grouped_reducescatter" if grouped else "reducescatter"
    err = check_tensors(tensors, kind, REDUCIBLE)
    for t in tensors:
        if t.dim() == 0:
            err = f"{kind}: tensors need at least one dimension"
    if op not in (Sum, Average):
        err = f"{kind} supports hvd.Sum and hvd.Average only, got {OP_NAMES.get(op, op)}"
    opname = OP_NAMES.get(op, "sum")
    req = Request(kind, name, tuple(str(t.dtype) for t in tensors),
                  tuple(tuple(t.shape) for t in tensors), opname, None, float(pre), float(post))
    srcs = [host(t) for t in tensors] if err is None else []
    for i, t in enumerate(srcs):
        if pre != 1.0:
            srcs[i] = t.clone() if t.data_ptr() == tensors[i].data_ptr() else t
            scale_(srcs[i], pre)

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        outs, handles = [], []
        for src in srcs:
            rows = even_splits(src.shape[0], comm.size)
            row = int(np.prod(src.shape[1:], dtype=np.int64))
            out = torch.empty((rows[comm.rank], *src.shape[1:]), dtype=src.dtype)
            handles.append(ireduce_scatter_(src, out, [r * row for r in rows], comm,
                                            "sum" if opname == "average" else opname))
            outs.append(out)
        size = comm.size

        def finish() -> Any:
            for o in outs:
                finish_reduce_(o, opname, size, post)
            results = [o.to(t.device) for o, t in zip(outs, tensors, strict=True)]
            return results if grouped else results[0]

        return MultiHandle(handles), finish

    return submit(ps, req, start, err, call)


def object_op(kind: str, obj: Any, root_rank: int | None, name: str | None, ps: Any) -> Any:
    """Collective: broadcast (root given) or all-gather a picklable object."""
    root = 0
    if root_rank is not None:
        root, err = root_index(ps, int(root_rank))
        if err is not None:
            raise argument_error(err)
    req = Request(kind, name or f"{kind}_object", root=root_rank)

    def start(comm: MPI.Intracomm, outcome: Outcome) -> tuple[Handle, Callable[[], Any]]:
        result = (comm.bcast(obj if comm.rank == root else None, root=root)
                  if root_rank is not None else comm.allgather(obj))
        return DONE, lambda: result

    return submit(ps, req, start, call=WAIT).result()
