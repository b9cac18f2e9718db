"""Horovod's tensor collectives: blocking, ``*_async`` and in-place (``*_``) forms.

Every call is collective over its process set (default: all ranks) and is agreed first (see
:mod:`mpitrain.horovod.negotiate`): ranks that disagree all raise HorovodInternalError.
``*_async`` calls are queued on the engine's communication thread and return at once
(:mod:`mpitrain.horovod.engine`); blocking calls wait for their result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpitrain.comm.handle import DONE
from mpitrain.grad.compression import Compression
from mpitrain.horovod import autograd as _ag
from mpitrain.horovod import context as _c
from mpitrain.horovod import negotiate as _n
from mpitrain.horovod import ops as _o
from mpitrain.horovod.handles import HvdHandle, register

Average, Sum, Adasum, Min, Max, Product = (_o.Average, _o.Sum, _o.Adasum, _o.Min, _o.Max,
                                           _o.Product)
_G = _c.global_process_set


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, process_set: Any = _G) -> HvdHandle:
    """Collective: start reducing ``tensor`` into a new tensor; returns a handle."""
    o = _o.op_of(op, average)
    return register(_o.allreduce_op([tensor], None, name, o, prescale_factor,
                                    postscale_factor, process_set, False))


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None,
                     name: str | None = None, op: int | None = None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: Any = _G) -> HvdHandle:
    """Collective: start reducing ``tensor`` in place; returns a handle."""
    o = _o.op_of(op, average)
    return register(_o.allreduce_op([tensor], [tensor], name, o, prescale_factor,
                                    postscale_factor, process_set, False))


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: Any = _G) -> torch.Tensor:
    """Collective: return the reduction (Average by default) of ``tensor``; differentiable."""
    o = _o.op_of(op, average)
    sent, cctx = compression.compress(tensor)
    out = _ag.call(_ag.HorovodAllreduce, sent, None, name, o, prescale_factor,
                   postscale_factor, process_set)
    result: torch.Tensor = compression.decompress(out, cctx)
    return result


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set: Any = _G) -> torch.Tensor:
    """Collective: reduce ``tensor`` in place; returns it."""
    o = _o.op_of(op, average)
    out: torch.Tensor = _o.allreduce_op([tensor], [tensor], name, o, prescale_factor,
                                        postscale_factor, process_set, False,
                                        call=_o.WAIT).result()
    return out


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: int | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: Any = _G) -> HvdHandle:
    """Collective: start reducing a list of tensors into new tensors; returns a handle."""
    o = _o.op_of(op, average)
    return register(_o.allreduce_op(list(tensors), None, name, o, prescale_factor,
                                    postscale_factor, process_set, True))


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: int | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: Any = _G) -> HvdHandle:
    """Collective: start reducing a list of tensors in place; returns a handle."""
    o = _o.op_of(op, average)
    ts = list(tensors)
    return register(_o.allreduce_op(ts, ts, name, o, prescale_factor, postscale_factor,
                                    process_set, True))


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = _G
                      ) -> list[torch.Tensor]:
    """Collective: return the reductions of a list of tensors; differentiable."""
    o = _o.op_of(op, average)
    pairs = [compression.compress(t) for t in tensors]
    outs = _ag.call(_ag.HorovodGroupedAllreduce, None, name, o, prescale_factor,
                    postscale_factor, process_set, *[p[0] for p in pairs])
    return [compression.decompress(t, p[1]) for t, p in zip(outs, pairs, strict=True)]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: Any = _G) -> list[torch.Tensor]:
    """Collective: reduce a list of tensors in place; returns them."""
    o = _o.op_of(op, average)
    ts = list(tensors)
    out: list[torch.Tensor] = _o.allreduce_op(ts, ts, name, o, prescale_factor,
                                              postscale_factor, process_set, True,
                                              call=_o.WAIT).result()
    return out


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None, op: int,
                           process_set: Any = _G) -> Callable[[], torch.Tensor]:
    """Collective: start reducing a sparse COO tensor (indices and values all-gathered).

    Returns a callable; ``synchronize(handle)`` (or ``handle()``) gives the sparse result.
    """
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    ih = _o.allgather_op([t.indices().transpose(0, 1).contiguous()],
                         None if name is None else f"{name}.indices", process_set, False)
    vh = _o.allgather_op([t.values().contiguous()],
                         None if name is None else f"{name}.values", process_set, False)
    size = (process_set or _G).size() or 1

    def handle() -> torch.Tensor:
        values = vh.result()
        indices = ih.result()
        if op == Average:
            values = values / size
        return torch.sparse_coo_tensor(indices.transpose(0, 1), values, t.size(),
                                       check_invariants=False)

    return handle


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: Any = _G) -> HvdHandle:
    """Collective: start concatenating every rank's ``tensor`` along dim 0."""
    return register(_o.allgather_op([tensor], name, process_set, False))


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: Any = _G) -> torch.Tensor:
    """Collective: concatenate every rank's ``tensor`` along dim 0 (dim 0 may differ)."""
    out: torch.Tensor = _ag.call(_ag.HorovodAllgather, tensor, name, process_set)
    return out


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: Any = _G) -> HvdHandle:
    """Collective: start all-gathering a list of tensors."""
    return register(_o.allgather_op(list(tensors), name, process_set, True))


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: Any = _G) -> list[torch.Tensor]:
    """Collective: all-gather a list of tensors; differentiable."""
    return list(_ag.call(_ag.HorovodGroupedAllgather, name, process_set, *tensors))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = _G) -> HvdHandle:
    """Collective: start broadcasting ``root_rank``'s tensor into a new tensor."""
    return register(_o.broadcast_op(tensor, root_rank, name, process_set, False))


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = _G) -> HvdHandle:
    """Collective: start broadcasting ``root_rank``'s tensor in place."""
    return register(_o.broadcast_op(tensor, root_rank, name, process_set, True))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = _G) -> torch.Tensor:
    """Collective: return ``root_rank``'s tensor (a global rank); differentiable."""
    out: torch.Tensor = _ag.call(_ag.HorovodBroadcast, tensor, root_rank, name, process_set)
    return out


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = _G) -> torch.Tensor:
    """Collective: overwrite ``tensor`` in place with ``root_rank``'s values; returns it."""
    out: torch.Tensor = _o.broadcast_op(tensor, root_rank, name, process_set, True,
                                        call=_o.WAIT).result()
    return out


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: Any = _G) -> HvdHandle:
    """Collective: start an all-to-all; ``synchronize`` returns (output, received_splits)."""
    return register(_o.alltoall_op(tensor, splits, name, process_set))


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: Any = _G) -> Any:
    """Collective: send ``splits[r]`` rows to rank r (equal parts without splits).

    Returns the received rows, and with ``splits`` also the received splits; differentiable.
    """
    return _ag.call(_ag.HorovodAlltoall, tensor, splits, name, process_set)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: Any = _G, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> HvdHandle:
    """Collective: start a reduce-scatter along dim 0 (first ranks get one more row)."""
    return register(_o.reducescatter_op([tensor], name, op, prescale_factor, postscale_factor,
                                        process_set, False))


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: Any = Compression.none, op: int = Average,
                  process_set: Any = _G, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Collective: reduce (Average or Sum) and keep this rank's block of dim 0."""
    sent, cctx = compression.compress(tensor)
    out = _ag.call(_ag.HorovodReducescatter, sent, name, op, process_set, prescale_factor,
                   postscale_factor)
    result: torch.Tensor = compression.decompress(out, cctx)
    return result


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                                op: int = Average, process_set: Any = _G,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> HvdHandle:
    """Collective: start reduce-scattering a list of tensors."""
    return register(_o.reducescatter_op(list(tensors), name, op, prescale_factor,
                                        postscale_factor, process_set, True))


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: int = Average,
                          process_set: Any = _G, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """Collective: reduce-scatter a list of tensors; differentiable."""
    pairs = [compression.compress(t) for t in tensors]
    outs = _ag.call(_ag.HorovodGroupedReducescatter, name, op, process_set, prescale_factor,
                    postscale_factor, *[p[0] for p in pairs])
    return [compression.decompress(t, p[1]) for t, p in zip(outs, pairs, strict=True)]


def barrier(process_set: Any = _G) -> None:
    """Collective: return once every rank of the set has called it."""
    _o.submit(process_set, _n.Request("barrier"),
              lambda comm, outcome: (DONE, lambda: None), call=_o.WAIT).result()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: Any = _G) -> Any:
    """Collective: return ``root_rank``'s picklable ``obj`` on every rank of the set."""
    return _o.object_op("broadcast", obj, root_rank, name, process_set)


def allgather_object(obj: Any, name: str | None = None, process_set: Any = _G) -> list[Any]:
    """Collective: return the list of every rank's picklable ``obj`` (rank order)."""
    return list(_o.object_op("allgather", obj, None, name, process_set))


def join(device: int = -1) -> int:
    """Collective: this rank has no more data; returns the rank that joined last.

    Until every rank has joined, this rank takes part in the others' all-reduces (global
    process set) with zeros; other collectives raise on the ranks still working. ``device``
    is accepted for compatibility (zeros are host tensors). When every rank has joined, the
    global set's response cache is emptied on every rank.
    """
    ctx = _c.context()
    ctx.raise_if_down("hvd.join")
    ctx.engine.drain()  # what this rank queued before joining comes first
    comm, ctl = ctx.world.comm, ctx.control_of(_G)
    state = ctx.state_of(_G)
    state.rounds += 1
    joined_at = state.rounds
    while True:
        rows = _n.exchange(ctl, _n.row(_n.JOINED, joined_at, state.rounds))
        rnd = _n.decide(rows)
        if rnd.done:
            state.cache.clear()
            return int(max(range(comm.size), key=lambda r: (int(rows[r, 1]), r)))
        if rnd.shutdown is not None:
            raise ctx.learn(_G, rnd.shutdown, "hvd.join")
        if rnd.failed:  # the active ranks' error path: take part in it
            _n.explain(ctl, None, None)
            state.cache.evict(rnd.stale)
        else:
            req, err = _n.joined_request(ctl, rows, rnd.entries[0], None, state.cache.request)
            if err is None and req.kind in ("allreduce", "grouped_allreduce"):
                _o.join_contribute(comm, req)
        state.rounds += 1
