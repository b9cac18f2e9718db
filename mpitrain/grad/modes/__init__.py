"""Opt-in asynchronous gradient-exchange modes (``--exchange``): see docs/async.md.

* ``local-sgd``: :class:`~mpitrain.grad.modes.local_sgd.LocalSGD`
* ``double-buffer``: :class:`~mpitrain.grad.modes.double_buffer.DoubleBuffer`
* ``param-server``: :mod:`mpitrain.grad.modes.param_server` (servers, role split) and
  :mod:`~mpitrain.grad.modes.param_server_worker` (the worker's wrapper)

Each module ends with its ``SPEC`` (:class:`~mpitrain.grad.protocol.ModeSpec`), registered
by one row of :data:`mpitrain.grad.protocol.MODES`. Importing this package does no MPI work.
"""

from __future__ import annotations
