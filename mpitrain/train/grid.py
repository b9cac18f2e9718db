"""Tensor x pipeline x data parallelism in the one loop: the grid's parts and its step.

``--tensor-parallel T --pipeline-stages P`` on N ranks form a
:class:`~mpitrain.parallel.grid.Grid` with N / (T x P) data-parallel replicas; each rank builds
one (pipeline stage, tensor slice) of the built-in GPT. The loop (``mpitrain.train.loop``) is
the same as for data parallelism: :class:`PipelineSteps` is its slot (the pipeline schedule over
the step's micro-batches) and :class:`GridExchange` the exchange it steps. Every rank of one
data-parallel index reads the same batches (the first stage uses the inputs, the last the
targets), so the data order is the data-parallel one over the replicas: with one replica it is
the single-process order, whatever the split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mpitrain.grad.protocol import ExchangeBase
from mpitrain.parallel.chunks import StageChunks
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import PipelineEngine
from mpitrain.runtime.collective import agree
from mpitrain.timeline.recorder import NULL, Timeline
from mpitrain.train.metrics import print_line
from mpitrain.train.steps import autocast_for

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.data.loader import Batch
    from mpitrain.parallel.spec import Stage, StageBuilder
    from mpitrain.runtime.world import World
    from mpitrain.train.grid_state import GridState
    from mpitrain.train.loop import Parts

log = logging.getLogger("mpitrain")


class GridExchange(ExchangeBase):
    """The exchange the loop steps for a grid: the data-parallel exchange (``DataParallel``
    or ZeRO's ``ShardedDataParallel`` over the replicas) runs inside the schedule
    (:class:`PipelineEngine`), so ``synchronize`` has nothing left to do."""

    def __init__(self, stage: nn.Module, engine: PipelineEngine, meta: dict[str, Any],
                 owned: list[World] | None = None) -> None:
        super().__init__(stage)
        self.engine = engine
        self.grid = engine.grid
        self.rules = cast("Stage", stage).merge_rules()
        #: interleaved chunks: ``state_dict`` names -> the dense model's (checkpoints keep
        #: the dense names); None when the stage's names are already the dense ones
        self.dense_names = stage.dense_names() if isinstance(stage, StageChunks) else None
        #: the model's shape, saved with its checkpoints and compared on resume
        self.meta = meta
        self._owned = owned or []
        #: ZeRO over the replicas (``--shard``): the optimizer steps the exchange's shards
        self.sharded = sharded_exchange(engine.dp)
        if self.sharded is not None:
            engine.sum_shared = self._sum_sharded
            trained = [p for p in stage.parameters() if p.requires_grad]
            self._slot = {id(p): i for i, p in enumerate(trained)}  # the layout's order

    @property
    def stage(self) -> Stage:
        """The wrapped stage (``module``, typed)."""
        return cast("Stage", self.module)

    def _shard_parts(self, i: int) -> list[tuple[int, int, int, int]]:
        """This rank's pieces of parameter ``i`` in the shards: (bucket, start, end, chunk
        start), in full-buffer coordinates."""
        lay, rank = self.sharded.layout, self.sharded.comm.rank
        a, b = lay.full_range(i)
        out = []
        for k in lay.slots[i].buckets:
            lo, hi = lay.shard_range(k, rank)
            if max(a, lo) < min(b, hi):
                out.append((k, max(a, lo), min(b, hi), lo))
        return out

    def _sum_sharded(self, params: Sequence[torch.nn.Parameter], comm: MPI.Intracomm) -> None:
        """Collective: sum the averaged gradients of ``params`` over ``comm`` where ZeRO keeps
        them: each rank's pieces are joined over the replicas (disjoint parts of one
        zero-filled buffer), summed over ``comm`` and written back to the shards."""
        from mpitrain.comm.allreduce import allreduce_

        sdp = self.sharded
        lay = sdp.layout
        spans = [lay.full_range(self._slot[id(p)]) for p in params]
        flat = torch.zeros(sum(b - a for a, b in spans), dtype=torch.float32)
        at, places = 0, []
        for p, (a, b) in zip(params, spans, strict=True):
            for k, s0, e0, lo in self._shard_parts(self._slot[id(p)]):
                grad = sdp.shards[k].grad
                if grad is not None:
                    flat[at + s0 - a : at + e0 - a] = grad[s0 - lo : e0 - lo]
                    places.append((k, s0 - lo, e0 - lo, at + s0 - a))
            at += b - a
        allreduce_(flat, sdp.comm, average=False)  # the replicas' disjoint pieces joined
        allreduce_(flat, comm, average=False)  # the tied / tensor-group sum
        for k, s0, e0, f0 in places:
            grad = sdp.shards[k].grad
            assert grad is not None
            grad[s0:e0] = flat[f0 : f0 + e0 - s0]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective with ZeRO: step the shards, then gather the parameters (otherwise the
        replicas' exchange steps: local SGD's optimizer is remembered for its averages)."""
        if self.engine.dp is not None:
            self.engine.dp.step(optimizer)
        else:
            optimizer.step()

    def after_step(self) -> None:
        """Collective (replicas): the replicas' exchange after the update (local SGD: every
        H steps the stage's slice is averaged over its data-parallel group)."""
        if self.engine.dp is not None:
            self.engine.dp.after_step()

    def bucket_engine(self) -> Any:
        """The replicas' ``DataParallel`` (``--bucket-mb auto`` resizes its buckets)."""
        return None if self.engine.dp is None else self.engine.dp.bucket_engine()

    def exchange_state_dict(self) -> dict[str, Any] | None:
        """Collective (grid): the replicas' exchange state (local SGD: every replica's own
        slice) of every (stage, tensor slice), gathered to rank 0 by grid position."""
        own = self.engine.dp.exchange_state_dict() if self.engine.dp is not None else None
        g = self.grid
        got = g.comm.gather((g.pp_rank * g.tensor + g.tp_rank, g.dp_rank, own), root=0)
        if g.comm.rank != 0 or got is None or all(s is None for _p, _d, s in got):
            return None
        return {"grid": [g.tensor, g.pipeline, g.data],
                "positions": {pos: s for pos, d, s in got if d == 0}}

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Collective (replicas): restore this position's exchange state; saved on another
        tensor x pipeline grid, only its counters (each replica continues from the state
        the checkpoint's grid payload holds, as right after an average)."""
        if self.engine.dp is None or "positions" not in state:
            return
        g = self.grid
        positions = state["positions"]
        if state["grid"][:2] == [g.tensor, g.pipeline]:
            mine = positions[g.pp_rank * g.tensor + g.tp_rank]
        else:
            mine = {**positions[0], "ranks": [], "anchor": None}
        self.engine.dp.load_exchange_state_dict(mine)

    def _stepped_grads(self) -> list[torch.Tensor]:
        """The gradients the optimizer steps (ZeRO: the shards')."""
        owners = self.sharded.shards if self.sharded is not None else self.module.parameters()
        return [p.grad for p in owners if p.grad is not None]

    def unscale_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective (grid): fp16: an inf/nan in any rank's gradients (one tensor slice, one
        stage, one shard) counts for every rank of the grid: it is planted in this rank's
        first gradient before ``scaler.unscale_``, so every scaler skips and backs off alike."""
        from mpi4py import MPI

        grads = self._stepped_grads()
        bad = any(not bool(torch.isfinite(g).all()) for g in grads)
        if self.grid.comm.allreduce(bad, op=MPI.LOR) and not bad and grads:
            grads[0].view(-1)[:1].fill_(float("inf"))
        scaler.unscale_(optimizer)

    def scaled_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective with ZeRO: ``scaler.step`` (skipped on every rank alike), ``update``,
        then the parameters gathered from the shards."""
        scaler.step(optimizer)
        scaler.update()
        if self.sharded is not None:
            self.sharded.gather_parameters()

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> GridState:
        """A grid's state: its slices in a directory beside the checkpoint file."""
        from mpitrain.train.grid_state import GridState

        return GridState(self, optimizer)

    def checkpoint_payload(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective (replicas): this (stage, tensor slice)'s dense state and its optimizer's
        per-parameter ``state_dict`` on data-parallel index 0 (ZeRO: joined from the shards,
        so a grid checkpoint is the same with and without ``--shard``); {} elsewhere."""
        if self.sharded is None:
            return {"model": self.module.state_dict(), "optim": optimizer.state_dict()}
        from mpitrain.checkpoint.shards import consolidate, optimizer_state_dict
        from mpitrain.grad.zero.state import shard_payload

        sdp = self.sharded
        payloads = sdp.comm.gather(shard_payload(sdp, optimizer, None), root=0)
        if sdp.comm.rank != 0:
            return {}
        doc = {"layout": sdp.layout.manifest(), "state_keys": list(self.module.state_dict())}
        full = consolidate(doc, payloads or [])
        names = [slot.name for slot in sdp.layout.slots]
        return {"model": full["model"], "optim": optimizer_state_dict(full, names)}

    def load_payload(self, optimizer: torch.optim.Optimizer, mine: dict[str, Any]) -> None:
        """Collective with ZeRO: load a (stage, tensor slice)'s dense state and optimizer."""
        if self.sharded is None:
            self.module.load_state_dict(mine["model"])
            optimizer.load_state_dict(mine["optim"])
            return
        from mpitrain.grad.zero.state import load_consolidated

        names = [n for n, _ in self.module.named_parameters()]
        state = mine["optim"].get("state", {})
        full = {"model": mine["model"], "param_groups": mine["optim"]["param_groups"],
                "optim_state": {n: state[i] for i, n in enumerate(names) if i in state}}
        load_consolidated(self.sharded, optimizer, full)

    def close(self) -> None:
        """Collective (grid): finish traffic; free the grid's and the replicas' communicators."""
        if self.engine.dp is not None:
            self.engine.dp.close()
        self.engine.close()
        for w in self._owned:
            w.free()
        self._owned = []
        self.grid.free()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (in place where they alias the data-parallel buckets; ZeRO:
        the exchange's own)."""
        if self.engine.dp is not None:
            self.engine.dp.zero_grad()
        else:
            self.module.zero_grad(set_to_none=set_to_none)

    def set_timeline(self, recorder: Timeline) -> None:
        """Record the replicas' exchange (buckets, ZeRO's collectives) into ``recorder``."""
        if self.engine.dp is not None:
            self.engine.dp.set_timeline(recorder)

    def replicas_identical(self) -> bool:
        """No: each rank holds its own part of the model."""
        return False

    def metrics(self) -> dict[str, float]:
        """This step's wait in pipeline receives, as a fraction of the step (the bubble),
        and the replicas' exchange's statistics."""
        st = self.engine.stats
        own = self.engine.dp.metrics() if self.engine.dp is not None else {}
        return {**own, "pipeline_wait_frac": st.wait_seconds / st.step_seconds
                if st.step_seconds > 0 else 0.0}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Collective (grid): clip to a global norm over every parameter of the model, once.

        Tensor-split parameters are summed over the tensor group, replicated ones (norms,
        row-layer biases) counted once, the tied head once (the first stage's embedding),
        the stages summed over the pipeline group; data-parallel replicas hold the same
        averaged gradients and are not summed (ZeRO: their disjoint shard pieces are).
        """
        from mpitrain.comm.allreduce import allreduce_

        split = torch.zeros(2, dtype=torch.float64)  # [tensor-split, replicated]
        grads = []
        if self.sharded is not None:  # each rank's pieces of the averaged gradients
            trained = [n for n, p in self.module.named_parameters() if p.requires_grad]
            for i, name in enumerate(trained):
                dim, _k, dropped = self.rules.get(name, [None, 1, False])
                for k, s0, e0, lo in self._shard_parts(i):
                    grad = self.sharded.shards[k].grad
                    if grad is not None and not dropped:
                        piece = grad[s0 - lo : e0 - lo].double()
                        split[0 if dim is not None else 1] += float(piece.pow(2).sum())
            grads = [g for g in (s.grad for s in self.sharded.shards) if g is not None]
            allreduce_(split, self.sharded.comm, average=False)
        for name, p in self.module.named_parameters() if self.sharded is None else ():
            if p.grad is None:
                continue
            dim, _k, dropped = self.rules.get(name, [None, 1, False])
            if not dropped:
                split[0 if dim is not None else 1] += float(p.grad.double().pow(2).sum())
            grads.append(p.grad)
        if self.grid.tp_rank != 0:
            split[1] = 0.0
        allreduce_(split, self.grid.tp_comm, average=False)
        total = split.sum().reshape(1)
        allreduce_(total, self.grid.pp_comm, average=False)
        norm = total.sqrt().to(torch.float32)[0]
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm


def sharded_exchange(dp: Any) -> Any:
    """The ZeRO exchange among the replicas, or None (plain ``DataParallel`` or none)."""
    from mpitrain.grad.zero.wrapper import ShardedDataParallel

    return dp if isinstance(dp, ShardedDataParallel) else None


class PipelineSteps:
    """The grid's step: the step's micro-batches through the pipeline schedule (one
    ``train_step`` per loaded batch, gradients reduced once on the last)."""

    accuracy = False

    def __init__(self, engine: PipelineEngine, device: torch.device,
                 precision: str = "fp32", scaler: Any = None) -> None:
        self.engine, self.device = engine, device
        self.autocast = autocast_for(precision, device)  # bf16: stages send bf16 activations
        self.scaler = scaler  # fp16: the loss scale multiplies the schedule's backward
        self.sum_comm = engine.grid.dp_comm
        g = engine.grid
        self.replicas, self.replica = g.data, g.dp_rank
        self.lead = g.tp_rank == 0 and g.pp_rank == 0  # its replica's samples, logged once
        self.timeline: Timeline = NULL

    def set_timeline(self, recorder: Timeline) -> None:
        """Record the schedule's span, its bubble, sends, receives and tensor-parallel
        collectives into ``recorder`` (the replicas' exchange: ``GridExchange.set_timeline``)."""
        self.timeline = recorder
        self.engine.set_timeline(recorder)
        recorder.note("the grid's gradient-norm (--clip-grad-norm) and fp16 overflow "
                      "all-reduces, and with --shard the tensor/tied sums of the shards' "
                      "gradients")

    def _split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        w = batch.x.to(self.device)
        return w[:, :-1], w[:, 1:]

    def forward_backward(self, micro: list[Batch]) -> tuple[float, int]:
        """Collective (grid): run the schedule on each batch; the loss is per token."""
        total = float(sum(int(b.mask.sum()) for b in micro))
        loss_sum = 0.0
        t_tl = self.timeline.now()
        for i, batch in enumerate(micro):
            x, y = self._split(batch)
            n = float(len(x))
            scale = 1.0  # fp16: scaler.scale() also starts the scaler's state (lazily made)
            if self.scaler is not None:
                scale = float(self.scaler.scale(torch.ones((), device=self.device)))
            with self.autocast:
                loss = self.engine.train_step(x, y, loss_scale=scale * n / max(total, 1.0),
                                              last=i == len(micro) - 1)
            loss_sum += loss * n
        self.timeline.span("pipeline schedule", t_tl)
        return loss_sum, 0

    def eval_batch(self, batch: Batch) -> tuple[float, float, float]:
        """Collective (grid): the batch's loss sum over its real samples, forward only."""
        keep = batch.mask.bool()
        n = int(keep.sum())
        if n == 0:  # every rank of this data-parallel index sees the same mask
            return 0.0, 0.0, 0.0
        x, y = self._split(batch)
        with self.autocast:
            return self.engine.eval_step(x[keep], y[keep]) * n, 0.0, float(n)


def memory_line(stage: torch.nn.Module) -> str:
    """Parameter bytes of this rank's stage (what splitting the model divides)."""
    n = sum(p.numel() for p in stage.parameters())
    b = sum(p.numel() * p.element_size() for p in stage.parameters())
    return f"{n} parameters ({b / 2**20:.1f} MiB)"


#: options that act on a grid's data-parallel replicas (their exchange and its transport)
REPLICA_OPTIONS = frozenset({"bucket_mb", "allreduce", "compression", "comm_progress",
                             "cuda_aware", "local_steps", "sync_warmup_steps",
                             "local_sgd_average_optimizer"})


def refuse_replica_options(cfg: TrainConfig, grid: Grid) -> None:
    """Refuse replica options on a grid with one replica (the same on every rank)."""
    from mpitrain.config_checks import explicit_options
    from mpitrain.errors import ConfigError, with_hint

    options = REPLICA_OPTIONS - ({"comm_progress"} if grid.pipeline > 1 else set())  # sends
    unused = sorted(options & explicit_options(cfg))
    unused += ["exchange"] if cfg.exchange != "sync" else []
    if unused:
        flags = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise ConfigError(with_hint(
            f"{flags} {'acts' if len(unused) == 1 else 'act'} on the data-parallel replicas "
            f"of a grid, and tensor {grid.tensor} "
            f"x pipeline {grid.pipeline} on {grid.comm.size} ranks has one replica",
            f"launch a multiple of {2 * grid.tensor * grid.pipeline} ranks, or drop them"))


def build_grid_parts(cfg: TrainConfig, world: World, device: torch.device,
                     make_reducer: Any, spec: StageBuilder) -> Parts:
    """Collective: the grid, this rank's stage of ``spec``, its schedule, optimizer and loaders.

    ``make_reducer(world, overlap)`` builds the data-parallel transport over the grid's
    replicas (``--allreduce``, ``--cuda-aware``, as for plain data parallelism); the replicas'
    exchange is ``--exchange``'s (sync or local SGD) or ZeRO's (``--shard``).
    """
    from mpitrain.comm.threaded import resolve_progress
    from mpitrain.grad.protocol import BuildContext, build_exchange
    from mpitrain.grad.zero.spec import build_sharded
    from mpitrain.runtime.world import World
    from mpitrain.train.corpus import open_corpus
    from mpitrain.train.loop import Parts
    from mpitrain.train.models import build_spec_stage
    from mpitrain.train.optim import build_optimizer, build_scheduler, rank_batch

    grid = Grid.create(world.comm, tensor=cfg.tensor_parallel, pipeline=cfg.pipeline_stages,
                       node_index=world.node_index)
    batch = agree(world.comm, lambda: rank_batch(cfg, grid.data))
    train, test = open_corpus(cfg, world, grid, batch, int(spec.meta.get("vocab", 256)))
    stage = build_spec_stage(spec, grid, world, device, cfg.virtual_stages,
                             cfg.activation_checkpointing)
    api = cast("Stage", stage)  # the grid's view of it (tied, ZeRO-3 units, ...)
    steps_per_epoch = -(-len(train) // cfg.accumulate)
    dp: Any = None
    owned: list[World] = []
    if grid.data > 1 or cfg.shard != "none":
        dp_world = World.create(grid.dp_comm)
        owned.append(dp_world)
        if cfg.shard != "none":  # ZeRO over the replicas, the same builder as --shard alone
            dp = build_sharded(BuildContext(cfg, dp_world, stage, device, steps_per_epoch),
                               units=api.zero3_units())
        else:  # the replicas' exchange from the mode registry: sync or local SGD
            dp = build_exchange(BuildContext(
                cfg, dp_world, stage, device, steps_per_epoch,
                make_reducer=lambda overlap: make_reducer(dp_world, overlap)))
    if dp is None:
        refuse_replica_options(cfg, grid)
    engine = PipelineEngine(stage, grid, micro_batches=cfg.micro_batches,
                            schedule=cfg.pipeline_schedule, data_parallel=dp,
                            tied=api.tied_parameters(),
                            sequence_parallel_params=api.sequence_parallel_parameters(),
                            device=device, eval_through_exchange=cfg.shard == "parameters",
                            progress=agree(world.comm, lambda: resolve_progress(
                                cfg.comm_progress)))
    params = dp.parameters() if cfg.shard != "none" else stage.parameters()
    optimizer = build_optimizer(cfg, params, grid.data)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    if world.rank == 0:
        micro = batch // cfg.micro_batches
        print_line(f"mpitrain: {spec.describe()}; {grid.describe()}; {cfg.micro_batches} "
                   f"micro-batches of {micro} ({cfg.pipeline_schedule}); "
                   f"stage 0: {memory_line(stage)}")
    meta = {**spec.meta, "optimizer": cfg.optimizer}
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    return Parts(GridExchange(stage, engine, meta, owned), optimizer, scheduler, train, test,
                 device, PipelineSteps(engine, device, cfg.precision, scaler), scaler)
