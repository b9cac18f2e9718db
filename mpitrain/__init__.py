"""mpitrain: data-parallel PyTorch training over MPI.

Importing this package does no MPI, CUDA or environment work; the public names below are
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DataParallel": "mpitrain.grad.parallel",
    "DistributedOptimizer": "mpitrain.grad.optimizer",
    "ShardedDataParallel": "mpitrain.grad.zero",
    "broadcast_parameters": "mpitrain.grad.broadcast",
    "broadcast_optimizer_state": "mpitrain.grad.broadcast",
    "World": "mpitrain.runtime.world",
    "MpitrainError": "mpitrain.errors",
    "ConfigError": "mpitrain.errors",
    "DataError": "mpitrain.errors",
    "CheckpointError": "mpitrain.errors",
    "CommError": "mpitrain.errors",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
