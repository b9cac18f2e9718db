"""``ShardedDataParallel``: ZeRO stages 1 and 2 over MPI on the gradient engine's transports.

Every rank keeps the full parameters (the module's ``.data`` are views of one flat, padded
buffer) but owns only chunk ``rank`` of every bucket of it: the optimizer is built over
:meth:`ShardedDataParallel.parameters`, one flat shard Parameter per bucket (a view of this
rank's chunk), so any ``torch.optim`` optimizer keeps state for 1/N of the model with no
special case. Per step::

    loss_fn(model(x), y).backward()   # buckets reduce-scatter during backward
    model.synchronize()               # collective: shard gradients averaged
    model.clip_grad_norm_(1.0)        # optional, collective (global norm)
    model.step(optimizer)             # optimizer.step() on the shard, then all-gather params
    model.zero_grad()

Stage 1 keeps a full gradient buffer (the module's ``.grad`` are views of it); stage 2 keeps
only the shard gradients (a bucket's full buffer lives from its first gradient to the end of
its reduce-scatter). See docs/sharding.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allgather import iallgather_
from mpitrain.comm.allreduce import allreduce_
from mpitrain.comm.broadcast import broadcast_
from mpitrain.comm.reducer import default_overlap
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.buckets import alloc_buffer, bucket_bytes_from_mb
from mpitrain.grad.consistency import check_same_layout, layout
from mpitrain.grad.protocol import ExchangeBase
from mpitrain.grad.zero.grads import ShardedGrads
from mpitrain.grad.zero.layout import ShardLayout, plan_layout

if TYPE_CHECKING:
    from mpi4py import MPI

#: --shard names -> ZeRO stage
STAGES = {"none": 0, "optimizer": 1, "gradients": 2}


class ShardedDataParallel(ExchangeBase):
    """Wrap ``module`` for data parallelism with sharded optimizer state (and gradients).

    Wrapping is collective: the layout check and the broadcast from rank 0 of
    :class:`~mpitrain.grad.parallel.DataParallel`, then the flat buffers are laid out.
    Implements the trainer's :class:`~mpitrain.grad.protocol.Exchange` protocol.

    Args:
        module: the model (float32 CPU parameters); ``model.module`` gives it back.
        comm: the communicator.
        stage: 1 (optimizer state sharded) or 2 (+ gradients sharded).
        bucket_mb: bucket size cap in MiB (the unit of reduce-scatter and all-gather).
        overlap: start each bucket's reduce-scatter during backward (default: per MPI).
        broadcast_buffers: after each synchronize, broadcast buffers (BatchNorm statistics)
            from rank 0, as DataParallel does.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        comm: MPI.Intracomm,
        stage: int = 1,
        bucket_mb: float | None = None,
        overlap: bool | None = None,
        broadcast_buffers: bool = True,
    ) -> None:
        super().__init__(module)
        if stage not in (1, 2):
            raise ConfigError(
                with_hint(f"ZeRO stage {stage} is not available", "use stage 1 or 2")
            )
        self.comm = comm
        self.stage = stage
        self.broadcast_buffers = broadcast_buffers
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for n, p in named:
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ConfigError(
                    with_hint(
                        f"parameter {n!r} is {p.dtype} on {p.device}; sharding supports "
                        "float32 CPU parameters",
                        "keep the master parameters float32 on the host, or use DataParallel",
                    )
                )
        check_same_layout(comm, layout(list(module.named_parameters()),
                                       list(module.named_buffers())))
        broadcast_parameters(module, comm, root=0)
        self.layout: ShardLayout = plan_layout(
            [n for n, _ in named], [tuple(p.shape) for _, p in named], comm.size,
            bucket_bytes_from_mb(bucket_mb),
        )
        lay = self.layout
        self.full_params = alloc_buffer(lay.total, torch.float32, torch.device("cpu"))
        self._params = [p for _, p in named]
        with torch.no_grad():
            for i, p in enumerate(self._params):
                a, b = lay.full_range(i)
                view = self.full_params[a:b].view(p.shape)
                view.copy_(p)
                p.data = view
        self.shards = [
            torch.nn.Parameter(self.full_params[slice(*lay.shard_range(b, comm.rank))])
            for b in range(len(lay.buckets))
        ]
        self.grads = ShardedGrads(
            self._params, lay, comm, keep_full=stage == 1,
            overlap=default_overlap() if overlap is None else overlap,
        )

    # ---- the DataParallel surface ------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (stage 1: re-attach the gradient views first)."""
        self.grads.attach()
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """Yield this rank's shard Parameters (one per bucket): build the optimizer over these."""
        yield from self.shards

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for the backward passes inside."""
        old = self.grads.enabled
        self.grads.enabled = False
        try:
            yield
        finally:
            self.grads.enabled = old

    def synchronize(self) -> None:
        """Collective: finish this step's reduce-scatters; shard ``.grad`` hold the averages."""
        self.grads.synchronize()
        for shard, g in zip(self.shards, self.grads.shard_grads, strict=True):
            shard.grad = g
        if self.broadcast_buffers:
            for buf in self.module.buffers():
                broadcast_(buf, self.comm, 0)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective: step ``optimizer`` (over the shards), then all-gather the parameters."""
        optimizer.step()
        self.gather_parameters()

    def gather_parameters(self) -> None:
        """Collective: refresh every rank's full parameters from their owners' shards."""
        ranks = self.layout.ranks
        handles = [
            iallgather_(self.full_params[s.offset : s.offset + s.padded(ranks)], self.comm)
            for s in self.layout.buckets
        ]
        for h in handles:
            h.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the shard gradients (they come back at the next synchronize)."""
        for shard in self.shards:
            shard.grad = None
        if self.stage == 2:
            for p in self._params:
                p.grad = None
        else:
            self.grads.dirty = True

    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Collective: scale the shard gradients so their global 2-norm is at most ``max_norm``.

        Same formula as ``torch.nn.utils.clip_grad_norm_`` (padding is zero, so the sum of
        squared shard norms is the norm of the full gradient). Returns the norm before clipping.
        """
        sq = torch.zeros((), dtype=torch.float64)
        for g in self.grads.shard_grads:
            sq += g.double().pow(2).sum()
        sq = sq.reshape(1)
        allreduce_(sq, self.comm, average=False)
        total = sq.sqrt().to(torch.float32).reshape(())
        coef = torch.clamp(max_norm / (total + eps), max=1.0)
        for g in self.grads.shard_grads:
            g.mul_(coef)
        return total

    def memory_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state (the tensors)."""
        out = {
            "parameters": self.full_params.numel() * 4,
            "gradients": self.grads.nbytes(),
            "optimizer": 0 if optimizer is None else optimizer_bytes(optimizer),
        }
        out["gradients_transient_peak"] = self.grads.peak_transient
        return out

    def replicas_identical(self) -> bool:
        """Every rank holds the same full parameters (optimizer state differs by design)."""
        return True

    def drain(self) -> None:
        """Collective: nothing is in flight between steps (step() gathers before returning)."""

    def close(self) -> None:
        """Collective: detach the gradient hooks (no traffic is left in flight)."""
        self.grads.remove_hooks()

    def describe(self) -> str:
        """One line: stage, buckets and the shard size."""
        lay = self.layout
        return (f"ZeRO stage {self.stage}: {len(lay.slots)} params in {len(lay.buckets)} "
                f"buckets, {lay.numel} elements, shard {lay.shard_numel()} per rank "
                f"({lay.total - lay.numel} padding)")


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, momentum buffers, steps)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
