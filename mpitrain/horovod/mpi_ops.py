"""``horovod.torch.mpi_ops``: the collectives, handles, basics and autograd functions by the
module path Horovod gives them (``from horovod.torch.mpi_ops import allreduce_async``).
"""

from __future__ import annotations

from typing import Any

from mpitrain.horovod.api import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allgather_async,
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
from mpitrain.horovod.autograd import (
    HorovodAllgather,
    HorovodAllreduce,
    HorovodAlltoall,
    HorovodBroadcast,
    HorovodGroupedAllgather,
    HorovodGroupedAllreduce,
    HorovodGroupedReducescatter,
    HorovodReducescatter,
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
from mpitrain.horovod.compression import Compression
from mpitrain.horovod.context import (
    ProcessSet,
    add_process_set,
    global_process_set,
    init,
    remove_process_set,
    shutdown,
)
from mpitrain.horovod.exceptions import HorovodInternalError
from mpitrain.horovod.handles import poll, synchronize
from mpitrain.horovod.ops import op_of
from mpitrain.horovod.timeline import start_timeline, stop_timeline


def handle_average_backwards_compatibility(op: Any, average: bool | None) -> int:
    """Return the op for ``op``/``average`` (``average`` is the deprecated spelling)."""
    return op_of(op, average)


__all__ = [
    "Adasum", "Average", "Compression", "HorovodAllgather", "HorovodAllreduce",
    "HorovodAlltoall", "HorovodBroadcast", "HorovodGroupedAllgather", "HorovodGroupedAllreduce",
    "HorovodGroupedReducescatter", "HorovodInternalError", "HorovodReducescatter", "Max", "Min",
    "ProcessSet", "Product", "Sum", "add_process_set", "allgather", "allgather_async",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "alltoall",
    "alltoall_async", "barrier", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built",
    "global_process_set", "gloo_built", "gloo_enabled", "grouped_allgather",
    "grouped_allgather_async", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "grouped_reducescatter",
    "grouped_reducescatter_async", "handle_average_backwards_compatibility", "init",
    "is_homogeneous", "is_initialized", "join", "local_rank", "local_size", "mpi_built",
    "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank", "reducescatter",
    "reducescatter_async", "remove_process_set", "rocm_built", "shutdown", "size",
    "sparse_allreduce_async", "start_timeline", "stop_timeline", "synchronize",
]
