"""Horovod's PyTorch API over mpitrain: ``import mpitrain.horovod as hvd``.

A ``horovod.torch`` script runs unchanged after replacing its import. Semantics follow
Horovod 0.28's documentation; docs/migrating-from-horovod.md lists every difference.

Horovod's API is process-global (``hvd.rank()`` takes no communicator), so ``hvd.init()``
makes one :class:`~mpitrain.horovod.context.Context` (world, process sets, integer handle
table, names in flight); every collective is agreed by all ranks before data moves
(:mod:`mpitrain.horovod.negotiate`), so mismatched calls raise on every rank instead of
hanging, and a rank that shuts down or exits makes its peers' calls raise.

``python -m mpitrain.horovod install-alias`` makes ``import horovod.torch as hvd`` give this
module (:mod:`mpitrain.horovod.alias`), for scripts and libraries that import Horovod.
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
from mpitrain.horovod import compression, elastic, functions, mpi_ops
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
from mpitrain.horovod.basics import (
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    rocm_built,
    size,
)
from mpitrain.horovod.context import (
    ProcessSet,
    add_process_set,
    configure,
    global_process_set,
    init,
    remove_process_set,
    shutdown,
)
from mpitrain.horovod.exceptions import HorovodInternalError, HostsUpdatedInterrupt
from mpitrain.horovod.handles import poll, synchronize
from mpitrain.horovod.optimizer import (
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from mpitrain.horovod.sync_batch_norm import SyncBatchNorm
from mpitrain.horovod.timeline import start_timeline, stop_timeline


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
    "compression",
    "configure",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "elastic",
    "functions",
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
    "mpi_ops",
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
