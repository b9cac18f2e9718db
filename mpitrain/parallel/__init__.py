"""Model parallelism over MPI: a process grid, tensor-parallel layers, pipeline schedules.

See docs/model-parallel.md. Importing does no MPI work; every collective takes the
communicator of its group (``Grid.tp_comm``, ``Grid.pp_comm``, ``Grid.dp_comm``).
"""

from __future__ import annotations

from mpitrain.parallel.grid import Grid

__all__ = ["Grid"]
