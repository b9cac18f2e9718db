"""``ShardedDataParallel``: ZeRO stages 1-3 over MPI on the gradient engine's transports.

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
its reduce-scatter); stage 3 keeps only the shards of the parameters too, each unit
(submodule) gathered around its forward and backward (:mod:`mpitrain.grad.zero.params`).
See docs/sharding.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allreduce import allreduce_
from mpitrain.comm.factory import close_shard_thread, make_shard_comm, set_shard_timeline
from mpitrain.comm.reducer import default_overlap
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.buckets import alloc_buffer, bucket_bytes_from_mb
from mpitrain.grad.consistency import check_same_layout, layout
from mpitrain.grad.protocol import ExchangeBase
from mpitrain.grad.recorded import broadcast_buffers, recorded
from mpitrain.grad.zero.grads import ShardedGrads
from mpitrain.grad.zero.layout import ShardLayout, plan_grouped_layout, plan_layout
from mpitrain.grad.zero.params import ShardedParams
from mpitrain.runtime.world import World
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.comm.shards import ShardComm
    from mpitrain.grad.zero.checkpoint import ShardedState

#: --shard names -> ZeRO stage
STAGES = {"none": 0, "optimizer": 1, "gradients": 2, "parameters": 3}
#: compression names -> the type gradients are reduce-scattered in
COMPRESSION: dict[str, torch.dtype | None] = {
    "none": None, "fp16": torch.float16, "bf16": torch.bfloat16,
}


class ShardedDataParallel(ExchangeBase):
    """Wrap ``module`` for data parallelism with sharded optimizer state (and gradients).

    Collective: wrapping runs the layout check and the broadcast from rank 0 of
    :class:`~mpitrain.grad.parallel.DataParallel`, then the flat buffers are laid out.
    Implements the trainer's :class:`~mpitrain.grad.protocol.Exchange` protocol.

    Args:
        module: the model (float32 CPU parameters); ``model.module`` gives it back.
        comm: the communicator.
        stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).
        bucket_mb: bucket size cap in MiB (the unit of reduce-scatter and all-gather; stage 3
            has one bucket per unit instead).
        compression: ``fp16`` or ``bf16`` reduce-scatters the gradients in that type (half the
            bytes; like the DataParallel hooks of the same names), ``none`` in float32.
        param_dtype: stage 3: gather the parameters (and compute) in bfloat16/float16 from
            float32 master shards, which the optimizer steps (mixed precision).
        units: stage 3: the submodules gathered as one (default: the module's children that
            hold parameters); parameters outside them stay gathered. Every rank must run the
            units in the same order (skipping one is fine; see ``zero.params``).
        overlap: start each bucket's reduce-scatter during backward (default: per MPI).
        broadcast_buffers: after each synchronize, broadcast buffers (BatchNorm statistics)
            from rank 0, as DataParallel does.
        algo: ``flat``, ``hierarchical`` (reduce-scatter / all-gather inside each node, then
            across nodes) or ``auto`` (hierarchical on real node boundaries with several
            ranks per node), as ``--allreduce``.
        staged: True stages the collectives through host buffers (also for CPU tensors);
            None: device parameters are staged unless ``cuda_aware``.
        cuda_aware: the agreed decision that MPI takes device buffers
            (:func:`mpitrain.runtime.cuda_aware.decide_cuda_aware`).
        world: ``World.create(comm)`` when the caller has one (else built here).
        progress: ``thread`` runs the reduce-scatters and all-gathers on communication
            threads (one per transport, ``--comm-progress``); ``poll`` the engine's waits.
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
        units: Sequence[torch.nn.Module] | None = None,
        compression: str = "none",
        param_dtype: torch.dtype | None = None,
        algo: str = "auto",
        staged: bool | None = None,
        cuda_aware: bool = False,
        world: World | None = None,
        progress: str = "poll",
    ) -> None:
        super().__init__(module)
        if param_dtype not in (None, torch.float32, torch.bfloat16, torch.float16) or (
                param_dtype not in (None, torch.float32) and stage != 3):
            raise ConfigError(with_hint(
                f"param_dtype {param_dtype} needs stage 3 and bfloat16 or float16",
                "use stage=3 (the parameters are gathered in that type from float32 shards)"))
        self.param_dtype = None if param_dtype == torch.float32 else param_dtype
        if compression not in COMPRESSION:
            raise ConfigError(with_hint(
                f"compression {compression!r} is not available with sharding",
                f"use one of {', '.join(COMPRESSION)} (no error feedback: each rank keeps "
                "only its shard of the gradient)"))
        if stage not in (1, 2, 3):
            raise ConfigError(
                with_hint(f"ZeRO stage {stage} is not available", "use stage 1, 2 or 3")
            )
        self.comm = comm
        self.stage = stage
        self.broadcast_buffers = broadcast_buffers
        #: records the reduce-scatters, all-gathers and buffer broadcasts (set_timeline)
        self.timeline: Timeline = NULL
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        device = named[0][1].device if named else torch.device("cpu")
        for n, p in named:
            if p.dtype != torch.float32 or p.device != device:
                raise ConfigError(
                    with_hint(
                        f"parameter {n!r} is {p.dtype} on {p.device}; sharding needs float32 "
                        f"parameters all on one device ({device})",
                        "keep the master parameters float32 (param_dtype gives bf16 compute), "
                        "on one device",
                    )
                )
        self.device = device
        self._closed = False
        self._own_world = world is None
        self.world = World.create(comm) if world is None else world
        transport_args = {"device": device, "cuda_aware": cuda_aware, "algo": algo,
                          "staged": staged, "progress": progress}

        def transport() -> ShardComm:
            return make_shard_comm(self.world, **transport_args)  # type: ignore[arg-type]

        #: the gradients' reduce-scatters (and stages 1-2's parameter all-gathers)
        self.transport = transport()
        check_same_layout(comm, layout(list(module.named_parameters()),
                                       list(module.named_buffers())))
        broadcast_parameters(module, comm, root=0)
        self._params = [p for _, p in named]
        self.sharded: ShardedParams | None = None
        self.full_params: torch.Tensor | None = None
        if stage == 3:
            self.layout, self.sharded = self._shard_parameters(module, named, units, transport())
            self.shards = self.sharded.shards
        else:
            self.layout = plan_layout(
                [n for n, _ in named], [tuple(p.shape) for _, p in named], comm.size,
                bucket_bytes_from_mb(bucket_mb),
            )
            lay = self.layout
            self.full_params = alloc_buffer(lay.total, torch.float32, device)
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
            self._params, self.layout, self.transport, keep_full=stage == 1,
            overlap=default_overlap() if overlap is None else overlap,
            compress=COMPRESSION[compression],
        )
        if self.sharded is not None:
            self.grads.on_ready = self.sharded.free_bucket
            self.grads.block_on_limit = False

    def _shard_parameters(
        self, module: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]],
        units: Sequence[torch.nn.Module] | None, gathers: ShardComm,
    ) -> tuple[ShardLayout, ShardedParams]:
        """Stage 3: one bucket per unit (+ one for the root's own parameters)."""
        from mpitrain.parallel.checkpointing import check_zero3_units

        if units is None:
            units = default_units(module)
        check_zero3_units(module, units)  # none inside an activation-checkpointed module
        index = {id(p): i for i, (_, p) in enumerate(named)}
        groups: list[list[int]] = []
        owner: dict[int, int] = {}
        for u, m in enumerate(units):
            members = [index[id(p)] for p in m.parameters() if id(p) in index
                       and id(p) not in owner]
            for i in members:
                owner[id(named[i][1])] = u
            groups.append(members)
        rest = [i for i, (_, p) in enumerate(named) if id(p) not in owner]
        kept = [m for m, g in zip(units, groups, strict=True) if g]
        groups = [g for g in groups if g]
        # the root's own parameters first: their bucket comes last in backward order
        layout = plan_grouped_layout([n for n, _ in named], [tuple(p.shape) for _, p in named],
                                     self.comm.size, ([rest] if rest else []) + groups)
        def bucket(i: int) -> int:
            return layout.slots[i].buckets[0]
        return layout, ShardedParams(
            module, kept, [bucket(g[0]) for g in groups], bucket(rest[0]) if rest else None,
            self._params, layout, gathers, self.comm.rank, self.param_dtype,
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
        if self.sharded is not None:
            self.sharded.finish_backward()
        self.grads.synchronize()
        for shard, g in zip(self.shards, self.grads.shard_grads, strict=True):
            shard.grad = g
        if self.broadcast_buffers:
            broadcast_buffers(self.module, self.comm, self.timeline)

    def set_timeline(self, recorder: Timeline) -> None:
        """Record every reduce-scatter, all-gather and buffer broadcast into ``recorder``."""
        self.timeline = self.grads.timeline = recorder
        set_shard_timeline(self.transport, recorder)  # communication threads' spans
        if self.sharded is not None:
            self.sharded.timeline = recorder
            set_shard_timeline(self.sharded.transport, recorder)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective: step ``optimizer`` (over the shards), then all-gather the parameters."""
        optimizer.step()
        self.gather_parameters()

    def unscale_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective: fp16: unscale the shard gradients; inf/nan in any rank's shard counts
        for all (each rank sees only its shard: without agreeing, one rank would skip the step
        and the others not). The agreed overflow is planted in this rank's first shard gradient
        before ``scaler.unscale_``, so every rank's scaler skips and backs off alike."""
        from mpi4py import MPI

        bad = any(not bool(torch.isfinite(g).all()) for g in self.grads.shard_grads)
        t0 = self.timeline.now()
        anywhere = self.comm.allreduce(bad, op=MPI.LOR)
        self.timeline.comm_blocking("allreduce overflow", 1, t0, "allreduce")
        if anywhere and not bad and self.grads.shard_grads:
            self.grads.shard_grads[0].view(-1)[:1].fill_(float("inf"))
        scaler.unscale_(optimizer)

    def scaled_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective: ``scaler.step`` over the shards (skipped together), then all-gather."""
        scaler.step(optimizer)
        scaler.update()
        self.gather_parameters()

    def gather_parameters(self) -> None:
        """Collective: refresh every rank's full parameters from their owners' shards.

        Stage 3 refreshes only the root's own parameters (units gather on use).
        """
        if self.sharded is not None:
            self.sharded.gather_always()
            return
        assert self.full_params is not None
        ranks = self.layout.ranks
        handles = []
        for s in self.layout.buckets:
            buf = self.full_params[s.offset : s.offset + s.padded(ranks)]
            handles.append(recorded(self.timeline, f"all-gather b{s.index}",
                                    buf.numel() * buf.element_size(), "all-gather",
                                    functools.partial(self.transport.iallgather_, buf)))
        for h in handles:
            h.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the shard gradients (they come back at the next synchronize)."""
        for shard in self.shards:
            shard.grad = None
        if self.stage >= 2:
            for p in self._params:
                p.grad = None
        else:
            self.grads.dirty = True

    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Collective: scale the shard gradients so their global 2-norm is at most ``max_norm``.

        Same formula as ``torch.nn.utils.clip_grad_norm_`` (padding is zero, so the sum of
        squared shard norms is the norm of the full gradient). Returns the norm before clipping.
        """
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in self.grads.shard_grads:
            sq += g.double().pow(2).sum()
        host = sq.reshape(1).cpu()
        t0 = self.timeline.now()
        allreduce_(host, self.comm, average=False)
        self.timeline.comm_blocking("allreduce grad norm", 8, t0, "allreduce")
        total = host.sqrt().to(torch.float32).reshape(())
        coef = torch.clamp(max_norm / (total + eps), max=1.0).to(self.device)
        for g in self.grads.shard_grads:
            g.mul_(coef)
        return total

    def memory_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state (the tensors)."""
        transient = 0
        if self.sharded is not None:  # persistent: the shards (and the root's own, gathered)
            root = self.sharded.always
            params = sum(s.numel() * 4 for s in self.shards)
            full = self.sharded.full
            params += 0 if root is None else full[root].numel() * full[root].element_size()
            transient = self.sharded.peak_live_bytes
        else:
            assert self.full_params is not None
            params = self.full_params.numel() * 4
        out = {
            "parameters": params,
            "gradients": self.grads.nbytes(),
            "optimizer": 0 if optimizer is None else optimizer_bytes(optimizer),
        }
        out["gradients_transient_peak"] = self.grads.peak_transient
        out["parameters_transient_peak"] = transient  # stage 3: units gathered at once, at most
        return out

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> ShardedState:
        """Sharded state: a shard directory beside the checkpoint file."""
        from mpitrain.grad.zero.checkpoint import ShardedState

        return ShardedState(self, optimizer)

    def replicas_identical(self) -> bool:
        """Every rank holds the same full parameters (optimizer state differs by design)."""
        return True

    def drain(self) -> None:
        """Collective: nothing is in flight between steps (step() gathers before returning)."""

    def close(self) -> None:
        """Collective: detach the gradient hooks, free the transports' communicators (once)."""
        if self._closed:
            return
        self._closed = True
        self.grads.remove_hooks()
        if self.sharded is not None:
            self.sharded.remove_hooks()
        self.transport.free()
        if self.sharded is not None:  # stage 3's gathers: their communication thread
            close_shard_thread(self.sharded.transport)
        if self._own_world:
            self.world.free()

    @contextlib.contextmanager
    def gathered(self, *, writeback: bool = False) -> Iterator[None]:
        """Collective: the module's full parameters inside (stage 3 gathers them all; ``writeback``
        keeps changes made to them, e.g. ``load_state_dict``). Stages 1-2 hold them anyway."""
        if self.sharded is None:
            yield
            return
        with self.sharded.gathered(writeback=writeback):
            yield

    def describe(self) -> str:
        """One line: stage, buckets and the shard size."""
        lay = self.layout
        return (f"ZeRO stage {self.stage}: {len(lay.slots)} params in {len(lay.buckets)} "
                f"buckets, {lay.numel} elements, shard {lay.shard_numel()} per rank "
                f"({lay.total - lay.numel} padding)")


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def default_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """ZeRO-3's default units: the children that hold parameters, looking inside containers
    (ModuleList, ModuleDict, Sequential), so each transformer block or layer is one."""
    out: list[torch.nn.Module] = []
    for c in module.children():
        if not any(p.requires_grad for p in c.parameters()):
            continue
        if isinstance(c, _CONTAINERS):
            out += default_units(c)
        else:
            out.append(c)
    return out


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, momentum buffers, steps)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
