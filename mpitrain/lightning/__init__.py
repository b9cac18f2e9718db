"""Lightning on mpitrain: ``MPIStrategy`` for ``lightning.Trainer`` (``pip install
mpitrain[lightning]``; docs/lightning.md).

Importing this package loads neither Lightning nor MPI; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MPIStrategy": "mpitrain.lightning.strategy",
    "MPIClusterEnvironment": "mpitrain.lightning.environment",
    "MPIOptions": "mpitrain.lightning.options",
    "consolidate_checkpoint": "mpitrain.lightning.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mpitrain.lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
