"""ZeRO-style sharded data parallelism: flat shard layout, reduce-scatter, wrapper, state.

Importing this package does no MPI work; names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ShardedDataParallel": "mpitrain.grad.zero.wrapper",
    "STAGES": "mpitrain.grad.zero.wrapper",
    "optimizer_bytes": "mpitrain.grad.zero.wrapper",
    "save_sharded": "mpitrain.grad.zero.state",
    "load_sharded": "mpitrain.grad.zero.state",
    "ShardLayout": "mpitrain.grad.zero.layout",
    "plan_layout": "mpitrain.grad.zero.layout",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpitrain.grad.zero' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
