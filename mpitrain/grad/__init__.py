"""Gradient exchange: buckets, overlap with backward, hooks, DataParallel, DistributedOptimizer.

Importing this package does no MPI work; names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DataParallel": "mpitrain.grad.parallel",
    "DistributedOptimizer": "mpitrain.grad.optimizer",
    "GradEngine": "mpitrain.grad.engine",
    "HookState": "mpitrain.grad.hooks",
    "make_hook": "mpitrain.grad.hooks",
    "HOOKS": "mpitrain.grad.hooks",
    "broadcast_parameters": "mpitrain.grad.broadcast",
    "broadcast_optimizer_state": "mpitrain.grad.broadcast",
    "broadcast_object": "mpitrain.grad.broadcast",
    "check_same_layout": "mpitrain.grad.consistency",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpitrain.grad' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
