"""``hvd.elastic``: Horovod's elastic API on a fixed MPI world.

``@hvd.elastic.run`` with an ``hvd.elastic.TorchState`` runs a job whose hosts never change
as an ordinary job: the state is synced from rank 0 before the function runs,
``state.commit()`` saves it in host memory (and agrees that no host changed),
``state.restore()`` puts the last commit back. Where an MPI job cannot do what Horovod's
driver does (follow hosts that come and go, drop a failed rank) it raises instead; see
:mod:`mpitrain.horovod.elastic.common` and docs/migrating-from-horovod.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpitrain.horovod import context as _c
from mpitrain.horovod.elastic.common import HostUpdateResult, ObjectState, State, run_fn
from mpitrain.horovod.elastic.sampler import ElasticSampler
from mpitrain.horovod.elastic.state import TorchState
from mpitrain.horovod.exceptions import HostsChangedError


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``func(state, ...)`` to run as Horovod's elastic training function.

    The state is synced from rank 0 first (not inside ``func``: new workers would otherwise
    meet collectives while others sync). A ``HostsUpdatedInterrupt`` without a host change
    resets Horovod on the same ranks (``shutdown()``, ``init()``, the state's reset callbacks)
    and calls ``func`` again; one with hosts added or removed raises ``HostsChangedError``; a
    ``HorovodInternalError`` restores the last commit and is raised again.
    """
    return run_fn(func, _reset)


def _reset() -> None:
    """Collective: end and restart Horovod on the same communicator and process sets."""
    ctx = _c.context()
    comm = ctx.init_comm
    sets = [ps for sid, ps in sorted(ctx.sets.items()) if sid != 0]
    progress, capacity = ctx.engine.progress, ctx.engine.cache_capacity
    _c.shutdown()
    _c.init(comm, process_sets=sets, progress=progress, cache_capacity=capacity)


__all__ = [
    "ElasticSampler",
    "HostUpdateResult",
    "HostsChangedError",
    "ObjectState",
    "State",
    "TorchState",
    "run",
    "run_fn",
]
