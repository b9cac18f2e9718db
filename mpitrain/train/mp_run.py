"""`python -m mpitrain --model gpt`: the model-parallel trainer (docs/model-parallel.md).

The ranks form a :class:`~mpitrain.parallel.grid.Grid`; each runs one (pipeline stage,
tensor slice) of the built-in GPT, with the data-parallel engine over its replicas. Every
rank of one data-parallel index reads the same batches (the first stage uses the inputs,
the last the targets), so the data order is the plain data-parallel one over ``data``
replicas: with one replica it is the single-process order, whatever the split.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain import checkpoint_compat as compat
from mpitrain.checkpoint import new_run_id
from mpitrain.errors import DataError, with_hint
from mpitrain.parallel.checkpoint import choose_resume, load_parallel, save_parallel
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import PipelineEngine
from mpitrain.preempt import PREEMPTED_EXIT_CODE
from mpitrain.runtime.collective import agree
from mpitrain.train.gpt import GPTConfig, GPTStage
from mpitrain.train.metrics import print_line

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig
    from mpitrain.data import BatchLoader
    from mpitrain.preempt import PreemptFlag
    from mpitrain.runtime.watchdog import Watchdog
    from mpitrain.runtime.world import World

log = logging.getLogger("mpitrain")


@dataclass
class MPState:
    """Progress of a model-parallel run (saved in its checkpoints)."""

    step: int = 0
    epoch: int = 0
    last_loss: float = float("nan")
    test_loss: float | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MPParts:
    """Everything one rank of the grid trains with."""

    grid: Grid
    stage: GPTStage
    engine: PipelineEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train: BatchLoader
    test: BatchLoader | None
    device: torch.device


def open_corpus(
    cfg: TrainConfig, world: World, grid: Grid
) -> tuple[BatchLoader, BatchLoader | None]:
    """Collective: open the token shards and this data-parallel index's loaders."""
    from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest
    from mpitrain.train.builtin import ensure_corpus

    data_dir = Path(cfg.data) if cfg.data else ensure_corpus(world.comm, cfg.context)

    def open_data() -> tuple[Any, Any]:
        shape = load_manifest(data_dir).arrays["x"].shape  # before the token ids are read
        if shape != (cfg.context + 1,):
            raise DataError(with_hint(
                f"'{data_dir}' holds samples of shape {shape}; --model gpt "
                f"with --context {cfg.context} needs token windows of {cfg.context + 1}",
                f"write them with: python -m data_tools corpus --context {cfg.context}"))
        # token ids outside [0, vocab) are refused here (or in the batch that reads them,
        # for data too large to check at open), never as an IndexError in the embedding
        vocab = GPTConfig.from_train(cfg).vocab
        train = ShardedDataset(data_dir, split=cfg.train_split, tokens=vocab)
        test = (ShardedDataset(data_dir, split=cfg.test_split, tokens=vocab)
                if cfg.test_split else None)
        return train, test

    train_ds, test_ds = agree(world.comm, open_data)
    sampler = DistributedSampler(len(train_ds), grid.dp_rank, grid.data, seed=cfg.seed,
                                 shuffle=cfg.shuffle, drop_last=True,
                                 chunk=train_ds.block_samples)
    agree(world.comm, lambda: sampler.check_batch(cfg.batch_size))
    train = BatchLoader(train_ds, sampler, cfg.batch_size, prefetch=cfg.prefetch)
    test = None
    if test_ds is not None:
        ts = DistributedSampler(len(test_ds), grid.dp_rank, grid.data, seed=cfg.seed,
                                shuffle="none", drop_last=False)
        test = BatchLoader(test_ds, ts, max(64, cfg.batch_size), prefetch=1)
    return train, test


def build_mp_parts(cfg: TrainConfig, world: World, device: torch.device) -> MPParts:
    """Collective: the grid, this rank's stage, its engine, optimizer and loaders."""
    from mpitrain.grad.hooks import make_hook
    from mpitrain.grad.parallel import DataParallel
    from mpitrain.train.optim import build_optimizer, build_scheduler

    grid = Grid.create(world.comm, tensor=cfg.tensor_parallel, pipeline=cfg.pipeline_stages,
                       node_index=world.node_index)
    train, test = open_corpus(cfg, world, grid)
    stage = GPTStage(GPTConfig.from_train(cfg), grid.tp_comm, grid.pp_rank, grid.pipeline)
    stage.to(device)
    dp = None
    if grid.data > 1:
        dp = DataParallel(stage, comm=grid.dp_comm, bucket_mb=cfg.bucket_mb,
                          hook=make_hook(cfg.compression))
    engine = PipelineEngine(stage, grid, micro_batches=cfg.micro_batches,
                            schedule=cfg.pipeline_schedule, data_parallel=dp,
                            tied=stage.tied_parameters(),
                            sequence_parallel_params=stage.sequence_parallel_parameters(),
                            device=device)
    optimizer = build_optimizer(cfg, stage.parameters(), grid.data)
    scheduler = build_scheduler(cfg, optimizer, len(train))
    return MPParts(grid, stage, engine, optimizer, scheduler, train, test, device)


def _split(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = batch.x.to(device)
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(p: MPParts) -> float:
    """Collective (grid): the mean next-token loss over the test split."""
    from mpitrain.comm.allreduce import allreduce_

    assert p.test is not None
    p.stage.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in p.test:
        keep = batch.mask.bool()
        n = int(keep.sum())
        if n == 0:
            continue
        x, y = _split(batch, p.device)
        loss = p.engine.eval_step(x[keep], y[keep])
        sums += torch.tensor([loss * n, n], dtype=torch.float64)
    p.stage.train()
    allreduce_(sums, p.grid.dp_comm, average=False)
    return float(sums[0] / sums[1])


class MPTrainer:
    """The loop: steps, evaluation, checkpoints, preemption (every call collective)."""

    def __init__(self, cfg: TrainConfig, world: World, parts: MPParts, watchdog: Watchdog):
        self.cfg, self.world, self.p, self.watchdog = cfg, world, parts, watchdog
        self.state = MPState()
        self.run_id = cfg.run_id or ""
        self._last_save = time.monotonic()
        self.last_saved = -1
        self.evaluated_at = -1  # the step of the last evaluation

    # -- checkpoints --
    def payload(self) -> dict[str, Any]:
        """This rank's state to save."""
        s = self.state
        return {
            "model": {k: v.detach().clone() for k, v in self.p.stage.state_dict().items()},
            "optim": self.p.optimizer.state_dict(),
            "sched": self.p.scheduler.state_dict(),
            "sampler": self.p.train.state_dict(),
            "state": {"step": s.step, "epoch": s.epoch, "last_loss": s.last_loss,
                      "tokens": s.tokens, "train_seconds": s.train_seconds},
        }

    def meta(self) -> dict[str, Any]:
        """The model's shape, saved in the manifest and checked on resume."""
        c = self.cfg
        return {"model": "gpt", "context": c.context, "hidden": c.hidden, "heads": c.heads,
                "layers": c.layers, "optimizer": c.optimizer}

    def save(self) -> Path:
        """Collective: checkpoint this step."""
        assert self.cfg.checkpoint_dir is not None
        cfg = self.cfg
        meta = {**self.meta(), "seed": cfg.seed}
        with self.watchdog.guard("checkpoint save", io=True):
            path = save_parallel(self.p.grid, Path(str(cfg.checkpoint_dir)), self.state.step,
                                 self.payload(), self.p.stage.merge_rules(), meta,
                                 run_id=self.run_id, keep_last=cfg.keep_last)
        self._last_save = time.monotonic()
        self.last_saved = self.state.step
        if self.world.rank == 0:
            log.info("checkpoint written: %s", path)
        return path

    def _check_holds(self, mine: dict[str, Any], what: str, doc: dict[str, Any]) -> None:
        """Refuse (one line) a payload whose tensors or optimizer differ from this rank's."""
        _kind, groups, _keys = compat.of_optimizer(self.p.optimizer)
        saved_groups, _ = compat.optimizer_holds(mine["optim"])
        compat.check(
            what,
            compat.Holds(tensors=compat.tensor_shapes(mine["model"].items()),
                         groups=saved_groups),
            compat.Holds(tensors=compat.tensor_shapes(self.p.stage.state_dict().items()),
                         groups=groups),
            saved_config=doc.get("meta"), now_config=self.meta())

    def plan(self) -> None:
        """Collective: pick the run id and the checkpoint to resume from (if any); load it."""
        cfg = self.cfg
        directory = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        choice = choose_resume(self.world.comm, directory, cfg.resume)
        if choice is None:
            self.run_id = str(self.world.comm.bcast(new_run_id(), root=0))
            return
        with self.watchdog.guard("resume: loading the checkpoint", io=True):
            mine, doc = load_parallel(self.p.grid, choice, self.meta())
        agree(self.p.grid.comm, lambda: self._check_holds(mine, str(choice), doc))
        self.run_id = str(doc.get("run_id", ""))
        self.p.stage.load_state_dict(mine["model"])
        self.p.optimizer.load_state_dict(mine["optim"])
        self.p.scheduler.load_state_dict(mine["sched"])
        self.p.train.load_state_dict(mine["sampler"])
        for k, v in mine["state"].items():
            setattr(self.state, k, v)
        self.last_saved = self.state.step
        if self.world.rank == 0:
            print_line(f"mpitrain: resumed from {choice} (step {self.state.step}, "
                       f"run {self.run_id})")

    # -- the loop --
    def _want_save(self) -> bool:
        cfg, step = self.cfg, self.state.step
        if cfg.checkpoint_dir is None:
            return False
        due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        if cfg.checkpoint_minutes:
            late = time.monotonic() - self._last_save >= 60 * cfg.checkpoint_minutes
            due = due or bool(self.world.comm.bcast(late, root=0))  # rank 0's clock decides
        return due

    def step(self, batch: Any) -> None:
        """Collective: one optimizer step on ``batch``."""
        p = self.p
        x, y = _split(batch, p.device)
        t0 = time.perf_counter()
        with self.watchdog.guard(f"step {self.state.step}"):
            loss = p.engine.train_step(x, y)
            if p.grid.data > 1:  # the mean over replicas (each reports its own batch's)
                loss = p.grid.dp_comm.allreduce(loss) / p.grid.data
        p.optimizer.step()
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=p.engine.dp is None)
        if p.engine.dp is not None:
            p.engine.dp.zero_grad()
        self.state.train_seconds += time.perf_counter() - t0
        self.state.step += 1
        self.state.last_loss = loss
        self.state.tokens += x.numel() * p.grid.data
        if not math.isfinite(loss):
            raise DataError(with_hint(f"step {self.state.step}: the loss is {loss}",
                                      "lower --lr or use --optimizer adamw"))

    def fit(self, flag: PreemptFlag) -> int:
        """Collective: train to the end (or an agreed preemption); returns the exit code."""
        cfg, st, p = self.cfg, self.state, self.p
        total = cfg.max_steps or cfg.epochs * len(p.train)
        first_epoch = True
        while st.epoch < cfg.epochs and st.step < total:
            if not (first_epoch and st.step > 0):
                p.train.set_epoch(st.epoch)  # a resume continues inside its epoch
            first_epoch = False
            for batch in p.train:
                self.step(batch)
                if self._want_save():
                    self.save()
                if flag.agreed(self.world.comm):
                    if cfg.checkpoint_dir is not None:
                        self.save()
                    if self.world.rank == 0:
                        print_line(f"mpitrain: preempted at step {st.step}; exiting "
                                   f"{PREEMPTED_EXIT_CODE}")
                    return PREEMPTED_EXIT_CODE
                if st.step % 50 == 0 and self.world.rank == 0:
                    log.info("step %d loss %.4f", st.step, st.last_loss)
                if st.step >= total:
                    break
            else:
                st.epoch += 1
                self._epoch_end()
                continue
            break
        if p.test is not None and self.evaluated_at != st.step:  # not again after the epoch's
            st.test_loss = evaluate(p)
        if cfg.checkpoint_dir is not None and self.last_saved != st.step:
            self.save()
        return 0

    def _epoch_end(self) -> None:
        cfg, st = self.cfg, self.state
        test = None
        if self.p.test is not None and cfg.eval_every and st.epoch % cfg.eval_every == 0:
            test = st.test_loss = evaluate(self.p)
            self.evaluated_at = st.step
        if self.world.rank == 0:
            extra = "" if test is None else f", test loss {test:.4f} (ppl {math.exp(test):.2f})"
            print_line(f"mpitrain: epoch {st.epoch}/{cfg.epochs}: step {st.step}, "
                       f"loss {st.last_loss:.4f}{extra}")
        st.history.append({"epoch": st.epoch, "step": st.step, "loss": st.last_loss,
                           "test_loss": test})
