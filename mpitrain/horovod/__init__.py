"""Horovod's PyTorch API over mpitrain: ``import mpitrain.horovod as hvd``.

A ``horovod.torch`` script runs unchanged after replacing its import. Semantics follow
Horovod 0.28's documentation; docs/migrating-from-horovod.md lists every difference.

Horovod's API is process-global (``hvd.rank()`` takes no communicator), so ``hvd.init()``
makes one :class:`~mpitrain.horovod.context.Context` (world, process sets, integer handle
table, names in flight); every collective is agreed by all ranks before data moves
(:mod:`mpitrain.horovod.negotiate`), so mismatched calls raise on every rank instead of
hanging.
"""

from __future__ import annotations

from typing import Any

from mpitrain.grad.compression import (
    BF16Compressor,
    Compression,
    Compressor,
    FP16Compressor,
    NoneCompressor,
)
from mpitrain.horovod import elastic
from mpitrain.horovod.api import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allgather_async,
    allgather_object,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    broadcast_object,
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    join,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
)
from mpitrain.horovod.context import (
    HorovodInternalError,
    ProcessSet,
    add_process_set,
    global_process_set,
    init,
    remove_process_set,
    shutdown,
)
from mpitrain.horovod.context import context as _context
from mpitrain.horovod.context import current as _current
from mpitrain.horovod.handles import poll, synchronize
from mpitrain.horovod.optimizer import (
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from mpitrain.horovod.sync_batch_norm import SyncBatchNorm
from mpitrain.horovod.timeline import start_timeline, stop_timeline


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod elastic's interrupt; never raised here (elastic mode is not provided)."""


def is_initialized() -> bool:
    """Return whether :func:`init` has been called (and not shut down)."""
    return _current() is not None


def rank() -> int:
    """Return this process's rank."""
    return _context().world.rank


def size() -> int:
    """Return the number of processes."""
    return _context().world.size


def local_rank() -> int:
    """Return the rank within this node."""
    return _context().world.local_rank


def local_size() -> int:
    """Return the number of processes on this node."""
    return _context().world.local_size


def cross_rank() -> int:
    """Return this node's index among nodes (rank in the cross-node communicator)."""
    return _context().world.cross_comm.rank


def cross_size() -> int:
    """Return the number of nodes holding a process with this local rank."""
    return _context().world.cross_comm.size


def is_homogeneous() -> bool:
    """Return whether every node runs the same number of processes (collective-free)."""
    w = _context().world
    return w.size == w.local_size * w.num_nodes


def mpi_threads_supported() -> bool:
    """Return whether MPI was initialized with MPI_THREAD_MULTIPLE."""
    from mpi4py import MPI

    _context()
    return bool(MPI.Query_thread() == MPI.THREAD_MULTIPLE)


def mpi_enabled() -> bool:
    """Return True: collectives run over MPI."""
    return True


def mpi_built(verbose: bool = False) -> bool:
    """Return True: built on MPI (mpi4py)."""
    return True


def gloo_enabled() -> bool:
    """Return False: there is no Gloo controller."""
    return False


def gloo_built(verbose: bool = False) -> bool:
    """Return False: no Gloo."""
    return False


def nccl_built(verbose: bool = False) -> int:
    """Return 0: NCCL is not used (device tensors go through MPI, staged or CUDA-aware)."""
    return 0


def ddl_built(verbose: bool = False) -> bool:
    """Return False: no IBM DDL."""
    return False


def ccl_built(verbose: bool = False) -> bool:
    """Return False: no oneCCL."""
    return False


def cuda_built(verbose: bool = False) -> bool:
    """Return False: no CUDA kernels of its own (CUDA tensors are staged or CUDA-aware MPI)."""
    return False


def rocm_built(verbose: bool = False) -> bool:
    """Return False: no ROCm kernels."""
    return False


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'mpitrain.horovod' has no attribute {name!r}")


__all__ = [
    "Adasum",
    "Average",
    "BF16Compressor",
    "Compression",
    "Compressor",
    "DistributedOptimizer",
    "FP16Compressor",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "Max",
    "Min",
    "NoneCompressor",
    "ProcessSet",
    "Product",
    "Sum",
    "SyncBatchNorm",
    "add_process_set",
    "allgather",
    "allgather_async",
    "allgather_object",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "alltoall",
    "alltoall_async",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "elastic",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "grouped_allgather",
    "grouped_allgather_async",
    "grouped_allreduce",
    "grouped_allreduce_",
    "grouped_allreduce_async",
    "grouped_allreduce_async_",
    "grouped_reducescatter",
    "grouped_reducescatter_async",
    "init",
    "is_homogeneous",
    "is_initialized",
    "join",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "poll",
    "rank",
    "reducescatter",
    "reducescatter_async",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "sparse_allreduce_async",
    "start_timeline",
    "stop_timeline",
    "synchronize",
]
