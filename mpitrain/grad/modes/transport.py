"""The modes' way onto the shared transports: one flat tensor through a reducer and a hook.

Every all-reduce of the asynchronous modes goes through a :class:`~mpitrain.comm.reducer.Reducer`
(host, staged, CUDA-aware; flat or hierarchical: ``comm.factory.make_reducer``) and a
compression hook (``grad.hooks``), exactly like the engine's buckets, so ``--compression``,
``--allreduce`` and the staged / CUDA-aware paths apply to them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.handle import Handle
from mpitrain.grad.buckets import Bucket
from mpitrain.grad.hooks import Hook, HookState, allreduce_hook, make_hook
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpitrain.comm.reducer import Reducer
    from mpitrain.grad.protocol import BuildContext


class FlatTransport:
    """All-reduce flat tensors through ``reducer`` with ``hook`` (one stream per ``key``).

    A ``key`` names one logical stream of tensors (its hook scratch and error-feedback
    residual): at most one tensor of a key may be in flight at a time.
    """

    def __init__(self, reducer: Reducer, hook: Hook | str | None = None) -> None:
        self.reducer = reducer
        self.hook: Hook = make_hook(hook) if isinstance(hook, str) else hook or allreduce_hook
        self.state = HookState(reducer)

    @property
    def size(self) -> int:
        """Number of ranks the reduction spans."""
        return self.reducer.size

    def iallreduce_(self, buf: torch.Tensor, key: int = 0) -> Handle:
        """Collective: start averaging ``buf`` in place (compressed by the hook)."""
        return self.hook(self.state, Bucket(index=key, dtype=buf.dtype, buffer=buf))

    def allreduce_(self, buf: torch.Tensor, key: int = 0) -> None:
        """Collective: average ``buf`` in place (compressed by the hook)."""
        self.iallreduce_(buf, key).wait()


def transport_for(
    ctx: BuildContext, params: Sequence[torch.Tensor], *, overlap: bool
) -> FlatTransport:
    """Collective: the run's transport (``ctx.make_reducer``) with ``--compression``'s hook.

    Without ``ctx.make_reducer`` (a wrapper built in code): host MPI on a duplicate of the
    world communicator, staged for device parameters.
    """
    from mpitrain.comm.factory import default_reducer

    if ctx.make_reducer is not None:
        reducer = ctx.make_reducer(overlap)
    else:
        reducer = default_reducer(derived(ctx.world.comm.Dup()), params, overlap=overlap)
    return FlatTransport(reducer, ctx.cfg.compression)
