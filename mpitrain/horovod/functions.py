"""``horovod.torch.functions``: broadcasts of parameters, optimizer state and objects."""

from __future__ import annotations

from mpitrain.horovod.api import (
    allgather,
    allgather_object,
    broadcast_,
    broadcast_async_,
    broadcast_object,
)
from mpitrain.horovod.basics import rank, size
from mpitrain.horovod.context import ProcessSet, global_process_set
from mpitrain.horovod.handles import synchronize
from mpitrain.horovod.optimizer import broadcast_optimizer_state, broadcast_parameters

__all__ = [
    "ProcessSet",
    "allgather",
    "allgather_object",
    "broadcast_",
    "broadcast_async_",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "global_process_set",
    "rank",
    "size",
    "synchronize",
]
