"""The training loop: steps with accumulation, exact distributed evaluation, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.checkpoint import payload
from mpitrain.comm.reducer import overlap_measured
from mpitrain.errors import DataError, with_hint
from mpitrain.grad.autotune import BucketAutotuner
from mpitrain.preempt import PREEMPTED_EXIT_CODE, PreemptFlag
from mpitrain.runtime.collective import agree
from mpitrain.runtime.inject import kill_point
from mpitrain.runtime.watchdog import Watchdog
from mpitrain.timeline.recorder import NULL, Timeline
from mpitrain.train.agree import StepAgreement, agreement_lag
from mpitrain.train.metrics import MetricsLog, Progress, print_line
from mpitrain.train.sample_log import SampleLog
from mpitrain.train.state import LoopState, restore_loop_state, rng_state
from mpitrain.train.straggler import straggler_rank

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.grad.autotune import HasEngine
    from mpitrain.grad.protocol import Exchange
    from mpitrain.runtime.ulfm import FaultDomain
    from mpitrain.runtime.world import World
    from mpitrain.train.steps import Steps

log = logging.getLogger("mpitrain")


@dataclass
class Parts:
    """What the loop trains: built by :mod:`mpitrain.train.run`."""

    model: Exchange  # DataParallel, an async mode, a sharded wrapper (grad/protocol.py)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: Any  # mpitrain.data.BatchLoader
    test_loader: Any | None
    device: torch.device
    steps: Steps  # the slot: a data-parallel step or a grid's pipeline schedule (train/steps.py)
    scaler: Any | None = None  # torch.amp.GradScaler for fp16


class Trainer:
    """Run epochs of training on one rank (collective throughout): the one loop of every kind
    of parallelism; what a step does is ``parts.steps`` (data parallel or a grid schedule)."""

    def __init__(
        self, cfg: TrainConfig, world: World, parts: Parts, *, watchdog: Watchdog | None = None
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.comm: MPI.Intracomm = world.comm
        self.p = parts
        self.state = LoopState()
        self.watchdog = watchdog if watchdog is not None else Watchdog.off(world.comm)
        self._grad_bytes = sum(
            p.numel() * p.element_size() for p in parts.model.module.parameters() if p.requires_grad
        )
        self.metrics = MetricsLog(
            Path(cfg.run_dir) if (cfg.run_dir and world.rank == 0) else None,
            cfg.tensorboard if world.rank == 0 else None,
        )
        self.preempt = PreemptFlag([])
        self.agreement = StepAgreement(self.comm, agreement_lag(cfg))
        self._last_ckpt_time = time.monotonic()
        self.last_saved_step = -1
        self.data_wait = 0.0
        self.comm_wait = 0.0
        self.timeline: Timeline = NULL  # --timeline: set by train.run (docs/profiling.md)
        steps = parts.steps  # --sample-log: one file per replica, its samples once
        self.samples = SampleLog(cfg.sample_log if steps.lead else None, steps.replica,
                                 steps.replicas)
        self.faults: FaultDomain | None = None  # --on-rank-loss shrink (train/recover.py)
        #: (step, sampler state) of the last step kept: where a shrunk world continues
        self.kept: tuple[int, dict[str, Any]] = (0, parts.train_loader.sampler.state_dict())
        self.tuner = None  # --bucket-mb auto; overlap too where this MPI was never measured
        if cfg.bucket_mb == 0:
            self.tuner = BucketAutotuner(self.comm, tune_overlap=not overlap_measured())

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """Collective: gather per-rank state; rank 0 returns the checkpoint dict, others None."""
        from mpitrain import __version__

        per_rank = {
            "rng": rng_state(),
            "loss_sum": self.state.loss_sum,
            "correct": self.state.correct,
            "seen": self.state.seen,
        }
        gathered = self.comm.gather(per_rank, root=0)
        exchange = self.p.model.exchange_state_dict()
        directory = Path(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None
        state_io = self.p.model.checkpoint_state(self.p.optimizer)
        weights, optim = payload.weights_state(  # ZeRO, grids: their directory is written now
            state_io, directory, self.state.step, self.cfg.run_id)
        if self.world.rank != 0:
            return None
        holds = payload.run_holds(state_io, self.p.optimizer)
        loop = asdict(self.state)
        for key in ("loss_sum", "correct", "seen"):
            loop.pop(key)
        return {
            "format": ckpt.FORMAT,
            "run_id": self.cfg.run_id,  # whose checkpoint this is (checkpoint.plan_run)
            "saved_at": ckpt.now_iso(),
            "step": self.state.step,
            "mpitrain_version": __version__,
            "world_size": self.world.size,
            "copies": self.world.size // self.p.steps.replicas,  # ranks per replica's sums
            "config": self.cfg.to_dict(),
            "model": weights,
            "optimizer": optim,
            "holds": holds,  # what the resume compares with the run first (checkpoint.compat)
            "scheduler": self.p.scheduler.state_dict(),
            "scaler": self.p.scaler.state_dict() if self.p.scaler is not None else None,
            "sampler": self.p.train_loader.state_dict(),
            "loop": loop,
            "ranks": gathered,
            "exchange": exchange,  # asynchronous modes' state (docs/async.md)
            "bucket_autotune": self.tuner.result.state_dict()
            if self.tuner is not None and self.tuner.result is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], origin: Path | None = None,
                        source: Path | None = None) -> None:
        """Restore from a checkpoint dict (every rank loads the same file, from ``origin``);
        another model or optimizer than this run's is refused first, with one line."""
        state_io = self.p.model.checkpoint_state(self.p.optimizer)
        agree(self.comm, lambda: payload.check_holds(
            state_io, self.p.optimizer, state, str(source or origin), self.cfg.to_dict()))
        state_io.load(state, origin)
        self.p.scheduler.load_state_dict(state["scheduler"])
        if self.tuner is not None:  # a finished search is kept, not repeated
            self.tuner.load_state_dict(state.get("bucket_autotune"))
        if self.p.scaler is not None and state.get("scaler") is not None:
            self.p.scaler.load_state_dict(state["scaler"])
        self.p.train_loader.load_state_dict(state["sampler"])
        if state.get("exchange") is not None:
            self.p.model.load_exchange_state_dict(state["exchange"])
        self.state = restore_loop_state(
            state, self.world.rank, self.world.size, self.cfg.seed,
            replica=self.p.steps.replica, copies=self.world.size // self.p.steps.replicas)
        self.kept = (self.state.step, self.p.train_loader.sampler.state_dict())

    def save(self) -> Path:
        """Collective: write a checkpoint of the current step, as a file of this run."""
        assert self.cfg.checkpoint_dir is not None
        directory = Path(self.cfg.checkpoint_dir)
        run_id = self.cfg.run_id
        if run_id is None:  # not planned up front (train.run.resume_if_asked): claim it now
            run_id = ckpt.plan_run(self.comm, None, directory).run_id
            self.cfg = self.cfg.replace(run_id=run_id)
        t_tl = self.timeline.now()
        with self.watchdog.guard("checkpoint save", io=True):
            state = self.state_dict()
            kill_point("checkpoint", self.state.step)  # MPITRAIN_KILL_AT (tests, bench)
            path = ckpt.save_collective(
                self.comm,
                state,
                directory,
                self.state.step,
                self.cfg.keep_last,
                run_id=run_id,
            )
            if self.world.rank == 0:
                # ZeRO's and grids' directories of pruned files go too
                kept = {i.step for i in ckpt.checkpoint_infos(directory) if i.run_id == run_id}
                payload.prune_directories(directory, run_id, kept)
        self.timeline.span("checkpoint", t_tl, cat="io")
        self._last_ckpt_time = time.monotonic()
        self.last_saved_step = self.state.step
        if self.world.rank == 0:
            log.info("checkpoint written: %s", path)
        return path

    # ---- one step ------------------------------------------------------------------------
    def _micro_batches(self, it: Iterator[Any]) -> list[Any]:
        out = []
        for _ in range(self.cfg.accumulate):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            finally:
                self.data_wait += time.perf_counter() - t0
            out.append(batch)
        return out

    def _step(self, micro: list[Any]) -> float:
        model, opt = self.p.model, self.p.optimizer
        tl = self.timeline
        total = float(sum(int(b.mask.sum()) for b in micro))
        loss_value, correct = self.p.steps.forward_backward(micro)
        if self.cfg.straggler_ms and self.world.rank == straggler_rank(
            self.cfg.straggler, self.cfg.seed, self.state.step, self.world.size
        ):
            time.sleep(self.cfg.straggler_ms / 1000.0)
        t0 = time.perf_counter()
        self.watchdog.enter("gradient all-reduce", self._grad_bytes)
        t_tl = tl.now()
        model.synchronize()
        tl.span("synchronize", t_tl, cat="sync")
        if self.faults is not None:  # --on-rank-loss shrink: kept on every rank, or on none
            self.faults.gate()
        for batch in micro:  # the step is kept: its samples and sums count
            self.samples.write(self.state.epoch, self.state.step, batch.index, batch.mask.numpy())
        self.state.correct += correct
        self.state.loss_sum += loss_value
        self.state.seen += int(total)
        t_tl = tl.now()
        self.comm_wait += time.perf_counter() - t0
        if self.p.scaler is not None:  # every rank finds the same inf/nan (ZeRO: agreed)
            model.unscale_(opt, self.p.scaler)
        if self.cfg.clip_grad_norm:  # the exchange's own (ZeRO: a global norm over shards)
            model.clip_grad_norm_(self.cfg.clip_grad_norm)
        if self.p.scaler is not None:  # so every rank's scaler skips (or takes) the step
            model.scaled_step(opt, self.p.scaler)
        else:
            model.step(opt)  # opt.step(), or the mode's own update (parameter server)
        model.after_step()  # e.g. local SGD's periodic model average
        self.p.scheduler.step()
        model.zero_grad()
        tl.span("optimizer", t_tl)
        return loss_value / max(total, 1.0)

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Collective: loss and accuracy over the test split, each sample counted once."""
        from mpi4py import MPI

        loader = self.p.test_loader
        if loader is None:
            return {}
        t_tl = self.timeline.now()
        model = self.p.model
        loader.set_epoch(0)  # the whole split, in stored order, every time
        sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, real samples
        model.drain()  # the newest parameters (param-server pull); eval() itself sends nothing
        model.eval()
        with torch.no_grad():
            for batch in loader:
                sums += np.array(self.p.steps.eval_batch(batch), dtype=np.float64)
        model.train()
        self.watchdog.enter("eval all-reduce", sums.nbytes)
        self.p.steps.sum_comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        self.timeline.span("evaluation", t_tl, cat="eval")
        n = max(sums[2], 1.0)
        out = {"test_loss": float(sums[0] / n), "test_samples": float(sums[2])}
        if self.p.steps.accuracy:
            out["test_accuracy"] = float(sums[1] / n)
        else:  # a language model: per-token loss, and its perplexity
            out["test_perplexity"] = math.exp(min(out["test_loss"], 700.0))
        return out

    # ---- the loop ------------------------------------------------------------------------
    def _flags(self) -> tuple[bool, bool]:
        """Collective: (stop for preemption, time-based checkpoint due) agreed by all ranks."""
        bits = 1 if self.preempt.received is not None else 0
        minutes = self.cfg.checkpoint_minutes
        if self.world.rank == 0 and minutes and self.cfg.checkpoint_dir:
            if time.monotonic() - self._last_ckpt_time >= 60.0 * minutes:
                bits |= 2
                self._last_ckpt_time = time.monotonic()  # asked once, even when agreed late
        self.watchdog.enter("step agreement", 4)
        t_tl = self.timeline.now()
        agreed = self.agreement.exchange(bits)
        self.timeline.span("step agreement", t_tl, cat="agree")
        return bool(agreed & 1), bool(agreed & 2)

    def _epoch_end(self, epoch: int, epoch_seconds: float, *, partial: bool = False) -> None:
        """Collective: report the epoch (``partial``: so far, evaluated, sums kept)."""
        from mpi4py import MPI

        sums = np.array(
            [self.state.loss_sum, self.state.correct, self.state.seen], dtype=np.float64
        )
        self.p.steps.sum_comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        n = max(sums[2], 1.0)
        train_loss, train_acc = float(sums[0] / n), float(sums[1] / n)
        if not math.isfinite(train_loss) and self.p.scaler is None:  # the same on every rank
            raise DataError(with_hint(f"epoch {epoch + 1}: the training loss is {train_loss}",
                                      "lower --lr (or use --optimizer adamw, --clip-grad-norm)"))
        self.state.last_train_loss = train_loss
        last = partial or epoch + 1 == self.cfg.epochs
        ev: dict[str, float] = {}
        if (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0) or last:
            ev = self.evaluate()
            if ev:
                self.state.last_eval = ev
        if self.world.rank == 0:
            rate = sums[2] / epoch_seconds if epoch_seconds > 0 else 0.0
            acc = self.p.steps.accuracy
            text = (  # a --max-steps stop inside the epoch: "partial epoch" (it goes on later)
                f"{'partial ' * partial}epoch {epoch + 1:>3}/{self.cfg.epochs}  "
                f"step {self.state.step:>6}  loss {train_loss:.4f}"
                + f"  acc {100 * train_acc:6.2f}%" * acc
            )
            if ev:
                text += f"  test_loss {ev['test_loss']:.4f}" + (
                    f"  test_acc {100 * ev['test_accuracy']:6.2f}%" if acc
                    else f"  test_ppl {ev['test_perplexity']:.2f}")
            print_line(text + f"  {rate:9.0f} samples/s")
            record = {
                "kind": "eval",
                "epoch": epoch + 1,
                "step": self.state.step,
                "train_loss": train_loss,
                **({"train_accuracy": train_acc} if acc else {}),
                "partial": partial,
                **ev,
            }
            self.metrics.write(record)
        if not partial:
            self.state.loss_sum, self.state.correct, self.state.seen = 0.0, 0, 0

    def _tuned(self) -> HasEngine:
        """The exchange whose buckets the tuner resizes (refused at configuration where the
        run's exchange has none)."""
        engine = self.p.model.bucket_engine()
        assert engine is not None, "--bucket-mb auto without a bucketed exchange"
        return engine

    def _autotune(self, seconds: float) -> None:
        """Collective when a candidate's trial ends: score bucket sizes (--bucket-mb auto)."""
        if self.tuner is None:
            return
        result = self.tuner.after_step(self._tuned(), seconds)
        if result is not None and self.world.rank == 0:
            log.info("bucket autotune: %s", result.table())

    def fit(self, preempt: PreemptFlag) -> int:
        """Collective: train until done, max_steps, or an agreed preemption; return exit code."""
        self.preempt = preempt
        self._fit_t0 = time.perf_counter()  # the metrics' wall-clock axis (this process)
        cfg, st = self.cfg, self.state
        loader = self.p.train_loader
        self.p.model.train()
        if self.tuner is not None:
            self.tuner.start(self._tuned())
        stop = bool(cfg.max_steps and st.step >= cfg.max_steps)  # resumed at the limit already
        while st.epoch < cfg.epochs and not stop:
            if not st.mid_epoch:
                loader.set_epoch(st.epoch)
                self.kept = (st.step, loader.sampler.state_dict())
            epoch_start = time.perf_counter()
            epoch_time_before = st.train_seconds
            st.mid_epoch = True
            it = iter(loader)
            bar = Progress(
                enabled=self.world.rank == 0 and cfg.progress,
                total=-(-len(loader) // cfg.accumulate),
                desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
            )
            while True:
                t_step = time.perf_counter()
                waited, comm_before = self.data_wait, self.comm_wait
                t_tl = self.timeline.now()
                micro = self._micro_batches(it)
                if not micro:
                    break
                self.timeline.step_begin(st.step, t_tl)
                self.timeline.span("data wait", t_tl, cat="data")
                self.watchdog.step_started(st.step)
                kill_point("step", st.step)
                loss = self._step(micro)
                st.step += 1
                self.kept = (st.step, loader.sampler.state_dict())
                n_global = sum(int(b.mask.sum()) for b in micro) * self.p.steps.replicas
                st.samples_total += n_global
                dt = time.perf_counter() - t_step
                st.train_seconds += dt
                self._autotune(dt)
                if self.world.rank == 0:
                    rate = n_global / dt if dt > 0 else 0.0
                    bar.update(loss, rate)
                    record = {
                        "step": st.step,
                        "epoch": st.epoch + 1,
                        "loss": loss,
                        "lr": self.p.optimizer.param_groups[0]["lr"],
                        "samples_per_sec": rate,
                        "data_wait_frac": (self.data_wait - waited) / dt if dt > 0 else 0.0,
                        "comm_frac": (self.comm_wait - comm_before) / dt if dt > 0 else 0.0,
                        "time": st.train_seconds,
                        "wall": time.perf_counter() - self._fit_t0,
                        "unix": time.time(),  # across incarnations (bench recovery)
                    }
                    record.update(self.p.model.metrics())
                    self.metrics.write(record)
                stop_now, time_due = self._flags()
                self.watchdog.step_done()
                steps_due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
                if stop_now:
                    self.agreement.drain()
                if cfg.checkpoint_dir and (steps_due or time_due or stop_now):
                    self.save()
                self.timeline.step_end()
                if stop_now:
                    if self.world.rank == 0:
                        sig = self.preempt.received
                        saved = "no checkpoint written (no --checkpoint-dir)"
                        if cfg.checkpoint_dir and self.last_saved_step == st.step:
                            where = ckpt.checkpoint_path(Path(cfg.checkpoint_dir), st.step)
                            saved = f"checkpoint saved to {where}"
                        print_line(
                            f"mpitrain: preempted ({sig.name if sig else 'signal on another rank'})"
                            f" at step {st.step}; {saved}, exiting {PREEMPTED_EXIT_CODE}"
                        )
                    return PREEMPTED_EXIT_CODE
                if cfg.max_steps and st.step >= cfg.max_steps:
                    stop = True
                    break
            del it
            bar.close()
            partial = stop and len(loader) > 0  # --max-steps mid-epoch: a resume continues it
            with self.watchdog.guard("end of epoch: metrics and evaluation"):
                seconds = st.train_seconds - epoch_time_before or time.perf_counter() - epoch_start
                self._epoch_end(st.epoch, seconds, partial=partial)
            if partial:
                break
            st.mid_epoch = False
            st.epoch += 1
        with self.watchdog.guard("end of training: last agreements and final evaluation"):
            self.agreement.drain()  # late agreements of the last steps: the run is done anyway
            if stop and not st.last_eval:
                st.last_eval = self.evaluate()
        if cfg.checkpoint_dir and self.last_saved_step != st.step:
            self.save()  # the final model, also what a resumed finished run starts from
        return 0
