"""Collectives on torch tensors (host, staged, CUDA-aware) and the Reducer protocol.

Importing this package does no MPI work; names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "allreduce_": "mpitrain.comm.allreduce",
    "iallreduce_": "mpitrain.comm.allreduce",
    "broadcast_": "mpitrain.comm.broadcast",
    "broadcast_tensors_": "mpitrain.comm.broadcast",
    "Handle": "mpitrain.comm.handle",
    "CompletedHandle": "mpitrain.comm.handle",
    "RequestHandle": "mpitrain.comm.handle",
    "ChainedHandle": "mpitrain.comm.handle",
    "MultiHandle": "mpitrain.comm.handle",
    "Reducer": "mpitrain.comm.reducer",
    "FlatReducer": "mpitrain.comm.reducer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpitrain.comm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
