"""``--on-rank-loss shrink``: keep training on the survivors when a rank dies (ULFM).

The one loop runs inside :func:`survive`. A lost peer surfaces as an MPI error of some
collective (main thread, communication thread, watchdog) or as a discarded step
(:meth:`FaultDomain.gate`). Then, on every survivor:

1. the step in flight is discarded everywhere (the per-step agreement, ``gate``), and every
   communicator derived from the world is revoked, so no survivor stays blocked;
2. the world shrinks to the ranks alive (``MPIX_Comm_shrink``);
3. the trainer is built again on the survivors — node and cross-node communicators, the
   reducer and its hierarchical groups, the grid, ZeRO's layout, watchdog, timeline — and
4. continues from the kept step: from memory where every rank held the same model and
   optimizer (replicated data parallel), else from the newest complete checkpoint, read and
   resharded to the survivors by the ordinary resume; the sampler divides the rest of the
   epoch among them.

A world the survivors cannot continue in (fewer than ``--min-ranks``) writes what it holds
as a checkpoint and exits 99 for a requeue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mpitrain.checkpoint import files as ckpt
from mpitrain.checkpoint.payload import ReplicatedState
from mpitrain.preempt import PREEMPTED_EXIT_CODE
from mpitrain.runtime.ulfm import FaultDomain, RankLost, check_shrink_available, suspected_loss
from mpitrain.train.metrics import print_line
from mpitrain.train.state import rng_state

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.train.loop import Trainer

log = logging.getLogger("mpitrain")


@dataclass
class Handoff:
    """What a shrunk world continues from."""

    state: dict[str, Any] | None  #: the kept step in memory (None: the newest checkpoint)
    lost: list[int]  #: ranks of the previous world that died
    old_size: int
    step: int  #: the step kept (the one in flight was discarded)
    failed_at: float  #: ``time.time()`` when this rank saw the failure
    timings: dict[str, float]  #: seconds per phase, for the report and ``bench recovery``


def snapshot(trainer: Trainer) -> dict[str, Any] | None:
    """Local: the kept step of a replicated run as a checkpoint dict (None: not replicated,
    not gated every step (exchange modes other than sync), or the kept step is not the
    trainer's: the newest checkpoint is read instead)."""
    p, cfg = trainer.p, trainer.cfg
    io = p.model.checkpoint_state(p.optimizer)
    step, sampler = trainer.kept
    if (cfg.exchange != "sync" or not isinstance(io, ReplicatedState)
            or not p.model.replicas_identical()
            or step != trainer.state.step or cfg.tensor_parallel * cfg.pipeline_stages > 1):
        return None
    model, optim = io.save(None, step, cfg.run_id)
    loop = asdict(trainer.state)
    mine = {key: loop.pop(key) for key in ("loss_sum", "correct", "seen")}
    return {
        "format": ckpt.FORMAT,
        "run_id": cfg.run_id,
        "step": step,
        "world_size": trainer.world.size,
        "copies": 1,
        "config": cfg.to_dict(),
        "model": model,
        "optimizer": optim,
        "holds": None,
        "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler is not None else None,
        "sampler": {**p.train_loader.state_dict(), **sampler},
        "loop": loop,
        "ranks": [{"rng": rng_state(), **mine}],  # this rank's; the survivors' are gathered
        "exchange": None,
        "bucket_autotune": None,
    }


def failure(trainer: Trainer | None, exc: BaseException) -> RankLost | None:
    """Local: the :class:`RankLost` that ``exc`` means, with the kept step attached (None:
    ``exc`` is not a lost peer)."""
    if not isinstance(exc, RankLost) and not suspected_loss(exc):
        return None
    if not isinstance(exc, RankLost):
        lost = RankLost(str(exc), agreed=False)
        lost.__cause__ = exc
    else:
        lost = exc
    lost.failed_at = getattr(lost, "failed_at", time.time())  # type: ignore[attr-defined]
    lost.state = snapshot(trainer) if trainer is not None else None  # type: ignore[attr-defined]
    lost.built = trainer is not None  # type: ignore[attr-defined]
    return lost


def continue_from(trainer: Trainer, handoff: Handoff) -> None:
    """Collective (the survivors): load the kept step from memory and check that every
    survivor holds the same model and optimizer."""
    assert handoff.state is not None
    comm = trainer.comm
    state = {**handoff.state, "ranks": comm.allgather(handoff.state["ranks"][0]),
             "world_size": handoff.old_size}
    state["holds"] = None
    trainer.load_state_dict(state, source=Path("(memory)"))
    digest = ckpt.state_digest(trainer.p.model.module, trainer.p.optimizer)
    ckpt.check_same_everywhere(comm, digest, "continuing on the survivors")


def report(handoff: Handoff, size: int, step: int, source: str) -> None:
    """Rank 0 of the survivors: one line on what was lost and where training goes on."""
    t = handoff.timings
    lost = ", ".join(map(str, handoff.lost))
    print_line(
        f"mpitrain: lost rank{'s' * (len(handoff.lost) > 1)} {lost} of {handoff.old_size}; "
        f"continuing on {size} ranks from step {step} ({source}); failure seen "
        f"t={handoff.failed_at:.6f}, agree {t['agree']:.3f} s, shrink {t['shrink']:.3f} s, "
        f"rebuild {t['rebuild']:.3f} s, state {t['reload']:.3f} s"
    )


TrainFn = Callable[["MPI.Intracomm", "FaultDomain", "Handoff | None"], int]


def survive(cfg: TrainConfig, comm: MPI.Intracomm, run: TrainFn) -> int:
    """Collective: run ``run`` (the trainer, built on the world it is given) until it ends,
    rebuilding it on the survivors after every lost rank; return the exit code."""
    check_shrink_available()
    domain = FaultDomain.create(comm)
    handoff: Handoff | None = None
    try:
        while True:
            try:
                return run(domain.comm, domain, handoff)
            except BaseException as exc:
                lost = exc if isinstance(exc, RankLost) else failure(None, exc)
                if lost is None and handoff is not None:
                    _abort_shrunk(domain, exc)  # the launch's communicators hold dead ranks
                if lost is None:
                    raise
            handoff = _shrink(cfg, domain, lost, handoff)
            if not handoff.lost:  # an MPI error, and every rank alive: not a loss
                _abort_shrunk(domain, lost.__cause__ or lost)
            usable = usable_ranks(cfg, domain.size)
            if usable < cfg.min_ranks or usable == 0:
                return _below_min_ranks(cfg, domain, handoff, usable)
            if usable < domain.size and not _keep(domain, usable, cfg):
                return 0  # this survivor sits the rest of the run out
    finally:
        domain.close()


def _abort_shrunk(domain: FaultDomain, exc: BaseException) -> None:
    """A failure on the survivors other than another lost rank: report it, end the job (the
    entry point's collective error path runs on the world before the loss)."""
    import sys

    from mpitrain.errors import MpitrainError
    from mpitrain.runtime.abort import abort_job, format_failure

    if isinstance(exc, SystemExit) and not exc.code:
        raise exc
    sys.stderr.write(format_failure(domain.rank, domain.size, exc))
    sys.stderr.flush()
    abort_job(domain.comm, exc.exit_code if isinstance(exc, MpitrainError) else 1)


def _shrink(cfg: TrainConfig, domain: FaultDomain, lost: RankLost,
            before: Handoff | None) -> Handoff:
    """Collective over the survivors: discard the step in flight, shrink, say what was lost."""
    t0 = time.time()
    failed_at = float(getattr(lost, "failed_at", t0))
    domain.revoke_all()  # first: a survivor blocked where nothing failed is released too
    if not lost.agreed:
        domain.commit(False)
    t1 = time.time()
    shrunk = domain.shrink()
    t2 = time.time()
    state = getattr(lost, "state", None)
    if not getattr(lost, "built", True) and before is not None:
        state = before.state  # lost again while rebuilding: nothing trained since
    step = int(state["step"]) if state is not None else -1
    # every survivor continues from the same source: memory only if all of them kept it
    in_memory = shrunk.comm.allreduce(int(state is not None), op=_min()) == 1
    if in_memory:
        steps = shrunk.comm.allgather(step)
        in_memory = len(set(steps)) == 1
    return Handoff(
        state=state if in_memory else None, lost=shrunk.lost, old_size=shrunk.old_size,
        step=step, failed_at=failed_at,
        timings={"agree": t1 - failed_at, "shrink": t2 - t1, "shrunk_unix": t2},
    )


def usable_ranks(cfg: TrainConfig, survivors: int) -> int:
    """The most of ``survivors`` a world of this config can train on: a multiple of tensor x
    pipeline whose data-parallel count divides ``--global-batch`` (with ``--accumulate``)."""
    group = cfg.tensor_parallel * cfg.pipeline_stages
    for n in range(survivors - survivors % group, 0, -group):
        if not cfg.global_batch or cfg.global_batch % (n // group * cfg.accumulate) == 0:
            return n
    return 0


def _keep(domain: FaultDomain, usable: int, cfg: TrainConfig) -> bool:
    """Collective: the first ``usable`` survivors go on; return False on those that do not."""
    from mpi4py import MPI

    rank, size = domain.rank, domain.size
    sub = domain.comm.Split(0 if rank < usable else MPI.UNDEFINED, rank)
    if rank == 0:
        print_line(f"mpitrain: {size} ranks survive; {usable} go on (tensor {cfg.tensor_parallel}"
                   f" x pipeline {cfg.pipeline_stages}, --global-batch {cfg.global_batch or '-'})"
                   f", {size - usable} sit the rest of the run out")
    if sub == MPI.COMM_NULL:
        return False
    domain.comm = cast("MPI.Intracomm", sub)
    return True


def _min() -> Any:
    from mpi4py import MPI

    return MPI.MIN


def _below_min_ranks(cfg: TrainConfig, domain: FaultDomain, handoff: Handoff,
                     usable: int) -> int:
    """Collective: too few usable survivors: save the kept step (from memory), exit 99."""
    comm = domain.comm
    saved = "the newest checkpoint stays the one to resume from"
    if handoff.state is not None and cfg.checkpoint_dir:
        state = {**handoff.state, "ranks": comm.allgather(handoff.state["ranks"][0]),
                 "world_size": comm.size}  # the ranks whose sums and RNGs it holds
        path = ckpt.save_collective(comm, state if comm.rank == 0 else None,
                                    Path(cfg.checkpoint_dir), handoff.step, cfg.keep_last,
                                    run_id=str(state.get("run_id") or cfg.run_id))
        saved = f"step {handoff.step} saved to {path}"
    if comm.rank == 0:
        print_line(
            f"mpitrain: {comm.size} ranks left after losing {handoff.lost}, {usable} usable, "
            f"fewer than --min-ranks {cfg.min_ranks} (or no grid fits); {saved}; exiting "
            f"{PREEMPTED_EXIT_CODE} for a requeue (--resume auto continues)")
    return PREEMPTED_EXIT_CODE
