"""``DataParallel``: the DDP-like face of the gradient engine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.factory import close_reducer, default_reducer, set_reducer_timeline
from mpitrain.comm.reducer import Reducer, default_overlap
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.consistency import check_same_layout, layout
from mpitrain.grad.engine import GradEngine
from mpitrain.grad.hooks import Hook, HookState, allreduce_hook, make_hook
from mpitrain.grad.protocol import BuildContext, ExchangeBase, ModeSpec
from mpitrain.grad.recorded import broadcast_buffers
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig


class DataParallel(ExchangeBase):
    """Wrap ``module`` for synchronous data-parallel training over ``comm``.

    Wrapping is collective: every rank checks it holds the same parameter/buffer layout
    (names, shapes, dtypes, order; a mismatch raises the same CommError everywhere), then
    parameters and buffers are broadcast from rank 0. Each step::

        loss = criterion(model(x), y); loss.backward()   # buckets reduce during backward
        model.synchronize()                              # wait + average (collective)
        optimizer.step(); optimizer.zero_grad()

    Args:
        module: the model; ``model.module`` gives it back.
        comm: the communicator (each rank passes its own handle to the same one).
        bucket_mb: bucket size cap in MiB (default ``buckets.DEFAULT_BUCKET_MB``).
        hook: ``hook(state, bucket) -> Handle`` or a registry name (none|fp16|bf16|fp16-ef|bf16-ef).
        hook_state: explicit state for the hook (default ``HookState(reducer)``).
        reducer: the transport (default: host MPI, staged for device parameters; see
            :func:`mpitrain.comm.factory.default_reducer`).
        overlap: start each bucket's reduction during backward (default: per MPI library).
        broadcast_buffers: after each synchronize, broadcast buffers (BatchNorm statistics)
            from rank 0, like DDP does before each forward.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        comm: MPI.Intracomm,
        bucket_mb: float | None = None,
        hook: Hook | str | None = None,
        hook_state: HookState | None = None,
        reducer: Reducer | None = None,
        overlap: bool | None = None,
        broadcast_buffers: bool = True,
    ) -> None:
        super().__init__(module)
        self.comm = comm
        self.broadcast_buffers = broadcast_buffers
        named_params = list(module.named_parameters())
        check_same_layout(comm, layout(named_params, list(module.named_buffers())))
        broadcast_parameters(module, comm, root=0)
        if overlap is None:
            overlap = getattr(reducer, "overlap", None)
            overlap = default_overlap() if overlap is None else bool(overlap)
        if reducer is None:  # host MPI; staged through host buffers for device parameters
            reducer = default_reducer(comm, [p for _, p in named_params], overlap=overlap)
        if hook is None:
            hook = allreduce_hook
        elif isinstance(hook, str):
            hook = make_hook(hook)
        self.reducer = reducer
        self.hook_state = hook_state if hook_state is not None else HookState(reducer)
        self.timeline: Timeline = NULL  # the buffer broadcast's span (buckets: the engine's)
        self.engine = GradEngine(
            named_params,
            hook=hook,
            state=self.hook_state,
            bucket_mb=bucket_mb,
            overlap=overlap,
        )

    def set_timeline(self, recorder: Timeline) -> None:
        """Record each bucket's reduction (launch, in flight, waited on) and the buffer
        broadcast into ``recorder``."""
        self.engine.timeline = recorder
        self.timeline = recorder
        set_reducer_timeline(self.reducer, recorder)  # the communication thread's spans

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (re-attaching bucket views as ``.grad`` first)."""
        self.engine.attach_grads()
        return self.module(*args, **kwargs)

    def synchronize(self) -> None:
        """Collective: finish the gradient exchange of this step (all buckets averaged)."""
        self.engine.synchronize()
        if self.broadcast_buffers:
            broadcast_buffers(self.module, self.comm, self.timeline)

    def close(self) -> None:
        """Collective: finish in-flight traffic; stop the transport's communication thread."""
        self.drain()
        close_reducer(self.reducer)

    def bucket_engine(self) -> DataParallel:
        """This wrapper: ``--bucket-mb auto`` rebuilds its ``engine``."""
        return self

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for the backward passes inside."""
        old = self.engine.enabled
        self.engine.enabled = False
        try:
            yield
        finally:
            self.engine.enabled = old


@dataclass(frozen=True)
class SyncOptions:
    """``--exchange sync``'s options (TrainConfig fields of the same names)."""

    bucket_mb: float | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SyncOptions:
        """Take the options from ``cfg`` (validated there)."""
        return cls(cfg.bucket_mb or None)  # 0 = auto: the trainer's autotuner rebuckets


def _build(ctx: BuildContext, opts: SyncOptions) -> DataParallel:
    return DataParallel(
        ctx.module,
        comm=ctx.world.comm,
        bucket_mb=opts.bucket_mb,
        hook=make_hook(ctx.cfg.compression),
        reducer=ctx.make_reducer(None) if ctx.make_reducer is not None else None,
    )


SPEC = ModeSpec(name="sync", options=SyncOptions.from_config, build=_build)
