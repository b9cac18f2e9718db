"""Horovod-compatible API over mpitrain: ``import mpitrain.horovod as hvd``.

A Horovod PyTorch script runs unchanged after replacing ``import horovod.torch as hvd``.
Semantics follow Horovod's documentation; see docs/migrating-from-horovod.md for the
differences. Unsupported features raise ``NotImplementedError`` naming the feature.

Horovod's API is process-global (``hvd.rank()`` takes no communicator), so this module keeps
one context created by :func:`init` (a ``World`` over a Dup of the given communicator, by
default ``COMM_WORLD``); asynchronous calls still return handles the caller owns (no global
handle table): pass them to :func:`synchronize` / :func:`poll`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.broadcast import broadcast_ as _bcast_
from mpitrain.comm.handle import DONE, Handle
from mpitrain.grad import broadcast as _gb
from mpitrain.grad.compression import (
    BF16Compressor,
    Compression,
    Compressor,
    FP16Compressor,
    NoneCompressor,
)
from mpitrain.grad.optimizer import DistributedOptimizer as _DistributedOptimizer

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.runtime.world import World

# reduction ops (Horovod exposes them as module constants)
Average = "average"
Sum = "sum"
Adasum = "adasum"
Min = "min"
Max = "max"
Product = "product"


@dataclass
class _Context:
    world: World


_ctx: _Context | None = None
__all__ = ["BF16Compressor", "Compression", "Compressor", "FP16Compressor", "NoneCompressor"]


def _unsupported(feature: str) -> NotImplementedError:
    return NotImplementedError(f"mpitrain.horovod does not support {feature}")


def _world() -> World:
    if _ctx is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _ctx.world


def _comm(process_set: Any = None) -> MPI.Intracomm:
    if process_set is not None and process_set is not global_process_set:
        raise _unsupported("process sets (process_set=...)")
    return _world().comm


global_process_set = object()  # Horovod's default process set (the only one supported)


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Collective: initialize over ``comm`` (an mpi4py communicator; default COMM_WORLD)."""
    global _ctx
    from mpi4py import MPI

    from mpitrain.runtime.world import World

    if process_sets is not None:
        raise _unsupported("process sets (init(process_sets=...))")
    if comm is None:
        comm = MPI.COMM_WORLD
    elif isinstance(comm, list | tuple):
        raise _unsupported("init(comm=[ranks]); pass an mpi4py communicator instead")
    if _ctx is None:
        _ctx = _Context(World.create(comm))


def shutdown() -> None:
    """Collective: release the communicators made by :func:`init`."""
    global _ctx
    if _ctx is not None:
        _ctx.world.free()
        _ctx = None


def is_initialized() -> bool:
    """Return whether :func:`init` has been called (and not shut down)."""
    return _ctx is not None


def rank() -> int:
    """Return this process's rank."""
    return _world().rank


def size() -> int:
    """Return the number of processes."""
    return _world().size


def local_rank() -> int:
    """Return the rank within this node."""
    return _world().local_rank


def local_size() -> int:
    """Return the number of processes on this node."""
    return _world().local_size


def cross_rank() -> int:
    """Return this node's index among nodes (rank in the cross-node communicator)."""
    return _world().cross_comm.rank


def cross_size() -> int:
    """Return the number of nodes holding a process with this local rank."""
    return _world().cross_comm.size


def mpi_threads_supported() -> bool:
    """Return whether MPI was initialized with MPI_THREAD_MULTIPLE."""
    from mpi4py import MPI

    return bool(MPI.Query_thread() == MPI.THREAD_MULTIPLE)


def mpi_enabled() -> bool:
    """Return True: the transport is MPI (``mpi_built`` too; no Gloo, no NCCL)."""
    return True


mpi_built = mpi_enabled


def gloo_enabled() -> bool:
    """Return False: no Gloo controller (``gloo_built`` too)."""
    return False


gloo_built = gloo_enabled


def nccl_built() -> int:
    """Return 0: NCCL is not used (device tensors go through the MPI reducers)."""
    return 0


# ---- collectives on tensors ------------------------------------------------------------------
def _check_op(op: Any, average: bool | None) -> bool:
    """Return whether to average; reject ops we do not provide."""
    if op is None:
        return True if average is None else bool(average)
    if op == Average:
        return True
    if op == Sum:
        return False
    raise _unsupported(f"reduction op {op!r} (use hvd.Average or hvd.Sum)")


class _Async:
    """Handle of an asynchronous Horovod call: the result tensor rides along."""

    def __init__(self, handle: Handle, result: Any, finish: Any = None) -> None:
        self.handle = handle
        self.result = result
        self.finish = finish

    def wait(self) -> Any:
        """Wait and return the result."""
        self.handle.wait()
        if self.finish is not None:
            self.result = self.finish()
            self.finish = None
        return self.result


def allreduce_async_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> _Async:
    """Collective: start an in-place all-reduce of ``tensor``; returns a handle."""
    comm = _comm(process_set)
    avg = _check_op(op, average)
    if prescale_factor != 1.0:
        tensor.mul_(prescale_factor)
    h = _ar.iallreduce_(tensor, comm, average=avg)

    def finish() -> torch.Tensor:
        if postscale_factor != 1.0:
            tensor.mul_(postscale_factor)
        return tensor

    return _Async(h, tensor, finish)


def allreduce_async(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> _Async:
    """Collective: start an all-reduce into a new tensor; returns a handle."""
    return allreduce_async_(tensor.detach().clone(), *args, **kwargs)


def allreduce_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Collective: all-reduce ``tensor`` in place (average by default); returns it."""
    h = allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set)
    out: torch.Tensor = h.wait()
    return out


def allreduce(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: Any = Compression.none,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = None,
) -> torch.Tensor:
    """Collective: return the all-reduce (average by default) of ``tensor`` as a new tensor."""
    sent, ctx = compression.compress(tensor.detach())
    out = sent.clone() if sent is tensor or sent.data_ptr() == tensor.data_ptr() else sent
    out = allreduce_(out.contiguous(), average, name, op, prescale_factor, postscale_factor,
                     process_set)
    result: torch.Tensor = compression.decompress(out, ctx)
    return result


def synchronize(handle: Any) -> Any:
    """Wait for an asynchronous call's handle and return its output."""
    if not isinstance(handle, _Async):
        raise TypeError("hvd.synchronize takes a handle returned by an *_async call")
    return handle.wait()


def poll(handle: Any) -> bool:
    """Return True if the asynchronous call has completed (never blocks)."""
    if not isinstance(handle, _Async):
        raise TypeError("hvd.poll takes a handle returned by an *_async call")
    return handle.handle.test()


def allgather(
    tensor: torch.Tensor, name: str | None = None, process_set: Any = None
) -> torch.Tensor:
    """Collective: concatenate every rank's ``tensor`` along dim 0 (first dims may differ)."""
    comm = _comm(process_set)
    t = tensor.detach().cpu().contiguous()
    counts = comm.allgather(t.shape[0])
    out = torch.empty((sum(counts), *t.shape[1:]), dtype=t.dtype)
    row = math.prod(t.shape[1:])
    send = _ar.numpy_view(t)
    comm.Allgatherv(send, [_ar.numpy_view(out), [c * row for c in counts]])
    return out.to(tensor.device)


def allgather_object(obj: Any, name: str | None = None, process_set: Any = None) -> list[Any]:
    """Collective: return the list of every rank's picklable ``obj``."""
    return list(_comm(process_set).allgather(obj))


def broadcast_async_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None
) -> _Async:
    """Collective: broadcast ``tensor`` in place from ``root_rank`` (completes before return)."""
    _bcast_(tensor, _comm(process_set), root_rank)
    return _Async(DONE, tensor)


def broadcast_async(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None
) -> _Async:
    """Collective: broadcast into a new tensor; returns a handle."""
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None
) -> torch.Tensor:
    """Collective: overwrite ``tensor`` in place with ``root_rank``'s values; returns it."""
    with torch.no_grad():
        _bcast_(tensor, _comm(process_set), root_rank)
    return tensor


def broadcast(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: Any = None
) -> torch.Tensor:
    """Collective: return ``root_rank``'s ``tensor`` as a new tensor."""
    return broadcast_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast_object(
    obj: Any, root_rank: int = 0, name: str | None = None, process_set: Any = None
) -> Any:
    """Collective: return ``root_rank``'s picklable ``obj`` on every rank."""
    return _gb.broadcast_object(obj, _comm(process_set), root_rank)


def broadcast_parameters(params: Any, root_rank: int, process_set: Any = None) -> None:
    """Collective: broadcast a ``state_dict()`` or ``named_parameters()`` from ``root_rank``."""
    if not isinstance(params, dict):
        params = list(params)
    _gb.broadcast_parameters(params, _comm(process_set), root_rank)


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int, process_set: Any = None
) -> None:
    """Collective: give every rank ``root_rank``'s optimizer state and hyperparameters."""
    _gb.broadcast_optimizer_state(optimizer, _comm(process_set), root_rank)


def join(device: int = -1) -> int:
    """Collective: wait for all ranks; returns the last rank (here: the highest rank).

    Horovod's uneven-input mode (joined ranks contributing zeros to later all-reduces of the
    others) is not provided: every rank must issue the same collectives.
    """
    comm = _comm()
    comm.Barrier()
    return comm.size - 1


def barrier(process_set: Any = None) -> None:
    """Collective: MPI barrier."""
    _comm(process_set).Barrier()


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
) -> _DistributedOptimizer:
    """Collective: wrap ``optimizer`` so gradients are averaged (or summed) across ranks."""
    if op not in (Average, Sum):
        raise _unsupported(f"DistributedOptimizer(op={op!r}); use hvd.Average or hvd.Sum")
    if gradient_predivide_factor != 1.0:
        raise _unsupported("gradient_predivide_factor")
    if groups is not None or num_groups:
        raise _unsupported("explicit fusion groups (groups/num_groups); use bucket_mb")
    return _DistributedOptimizer(
        optimizer,
        named_parameters,
        comm=_comm(process_set),
        backward_passes_per_step=backward_passes_per_step,
        compression=getattr(compression, "name", compression),
        op=op,
    )


_UNSUPPORTED = {
    "alltoall": "alltoall",
    "alltoall_async": "alltoall",
    "reducescatter": "reducescatter",
    "reducescatter_async": "reducescatter",
    "grouped_allreduce": "grouped_allreduce",
    "grouped_allreduce_async": "grouped_allreduce",
    "grouped_allreduce_": "grouped_allreduce",
    "SyncBatchNorm": "SyncBatchNorm",
    "elastic": "elastic training (hvd.elastic)",
    "ProcessSet": "process sets",
    "add_process_set": "process sets",
    "remove_process_set": "process sets",
    "start_timeline": "the Horovod timeline",
    "stop_timeline": "the Horovod timeline",
}


def __getattr__(name: str) -> Any:
    feature = _UNSUPPORTED.get(name)
    if feature is not None:
        raise _unsupported(f"hvd.{name} ({feature})")
    raise AttributeError(f"module 'mpitrain.horovod' has no attribute {name!r}")
