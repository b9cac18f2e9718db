"""`python -m mpitrain [train]`: build everything from the config and run the loop."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.config import TrainConfig, add_arguments, resolve
from mpitrain.config_checks import LANGUAGE_MODELS
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.protocol import get_mode
from mpitrain.preempt import PreemptFlag, parse_signals
from mpitrain.runtime import env
from mpitrain.runtime.collective import agree
from mpitrain.runtime.watchdog import Watchdog
from mpitrain.runtime.world import World
from mpitrain.slurm.world import check_slurm_world
from mpitrain.timeline import check_timeline_path, start_timeline
from mpitrain.train.loop import Parts, Trainer
from mpitrain.train.metrics import print_line, summary_line, write_summary
from mpitrain.train.models import ClassifierSpec, check_classifier, resolve_seeded
from mpitrain.train.optim import lr_note
from mpitrain.train.recover import continue_from, failure, report

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.runtime.ulfm import FaultDomain
    from mpitrain.train.recover import Handoff

log = logging.getLogger("mpitrain")

DESCRIPTION = """\
Train a PyTorch model data-parallel across MPI ranks:  mpiexec -n N python -m mpitrain [options]
With no options it trains an MLP on scikit-learn's handwritten digits (cached as HDF5 shards).
Options also come from MPITRAIN_<NAME> variables and --config FILE (TOML); flags win.
Other commands: doctor, bench, plot, slurm, sweep-summary, cluster
(python -m mpitrain COMMAND --help).
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the train command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m mpitrain",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    """Parse flags and resolve the full config (flags > env > file > defaults)."""
    ns = build_parser().parse_args(argv)
    return resolve(vars(ns))


def setup_logging(rank: int, level: str) -> None:
    """Log lines prefixed with the rank; rank 0 at ``level``, others at warning and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    root = logging.getLogger("mpitrain")
    root.handlers[:] = [handler]
    lvl = getattr(logging, level.upper())
    root.setLevel(lvl if rank == 0 else max(lvl, logging.WARNING))
    root.propagate = False


def choose_device(cfg: TrainConfig, world: World) -> torch.device:
    """Collective: bind this rank to its device (one rank per GPU) and check the precision."""
    from mpitrain.config_checks import check_device_options
    from mpitrain.runtime.device import bind_device

    device = bind_device(world, cfg.device, allow_shared=cfg.allow_shared_gpu)
    check_device_options(cfg, device.type)  # --cuda-aware on a rank that got no GPU
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            with_hint("--precision fp16 needs a CUDA device", "use --precision bf16 on CPU")
        )
    return device


def build_reducer(
    cfg: TrainConfig, world: World, device: torch.device, overlap: bool | None = None
) -> Any:
    """Collective: pick the gradient transport (CUDA-aware, staged, flat or hierarchical)."""
    from mpitrain.comm.factory import describe, make_reducer
    from mpitrain.comm.threaded import resolve_progress
    from mpitrain.runtime.cuda_aware import decide_cuda_aware

    decision = None
    if device.type == "cuda":
        decision = decide_cuda_aware(world.comm, device, cfg.cuda_aware)
        if world.rank == 0:
            log.info("CUDA-aware MPI: %s", decision.describe())
    progress = agree(world.comm, lambda: resolve_progress(cfg.comm_progress))
    reducer = make_reducer(world, device=device, cuda_aware=decision, algo=cfg.allreduce,
                           overlap=True if progress == "mpi" else overlap, progress=progress)
    if world.rank == 0:
        log.info("gradient transport: %s", describe(reducer))
    return reducer


def build_parts(
    cfg: TrainConfig, world: World, device: torch.device, ps_link: Any = None,
    spec: Any = None,
) -> Parts:
    """Collective: open the data, build and wrap the model, optimizer and schedule.

    ``spec``: the classifier spec already resolved (a user's factory, built once)."""
    from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset
    from mpitrain.data.parallel_io import use_driver
    from mpitrain.grad.compile import compile_model
    from mpitrain.grad.protocol import BuildContext, build_exchange
    from mpitrain.grad.zero.spec import build_sharded
    from mpitrain.grad.zero.wrapper import ShardedDataParallel
    from mpitrain.parallel.checkpointing import declared_units, zero3_units_around
    from mpitrain.train.builtin import ensure_digits
    from mpitrain.train.models import build_model
    from mpitrain.train.optim import (
        base_lr,
        build_optimizer,
        build_scheduler,
        global_batch,
        rank_batch,
    )
    from mpitrain.train.steps import ClassifierSteps

    data_dir = Path(cfg.data) if cfg.data else ensure_digits(world.comm)

    def open_data() -> tuple[Any, Any]:
        train = ShardedDataset(data_dir, split=cfg.train_split)
        test = ShardedDataset(data_dir, split=cfg.test_split) if cfg.test_split else None
        return train, test

    train_ds, test_ds = agree(world.comm, open_data)
    use_driver(cfg.hdf5_driver, cfg.prefetch, (train_ds, test_ds), world.comm)
    sampler = DistributedSampler(
        len(train_ds),
        world.rank,
        world.size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        drop_last=True,
        chunk=train_ds.block_samples,
    )
    batch = agree(world.comm, lambda: rank_batch(cfg, world.size))
    if world.rank == 0:
        log.info("global batch %d = %d ranks x %d samples x %d accumulated (lr %.4g)",
                 global_batch(cfg, world.size), world.size, batch, cfg.accumulate,
                 base_lr(cfg, world.size))
    train_loader = BatchLoader(
        train_ds,
        sampler,
        batch,
        prefetch=cfg.prefetch,
        pin_memory=device.type == "cuda",
    )
    test_loader = None
    if test_ds is not None:
        test_sampler = DistributedSampler(
            len(test_ds), world.rank, world.size, seed=cfg.seed, shuffle="none", drop_last=False
        )
        test_loader = BatchLoader(
            test_ds, test_sampler, max(256, batch), prefetch=min(1, cfg.prefetch)
        )
    steps_per_epoch = -(-len(train_loader) // cfg.accumulate)
    if steps_per_epoch < 1:
        raise ConfigError(
            with_hint(
                f"{len(train_ds)} training samples are fewer than ranks x batch "
                f"({world.size} x {batch})",
                f"lower {'--global-batch' if cfg.global_batch else '--batch-size'} "
                "or use fewer ranks",
            )
        )
    torch.manual_seed(cfg.seed)
    module = agree(
        world.comm,
        lambda: build_model(cfg, train_ds.feature_shape, train_ds.num_classes, spec),
    ).to(device)
    compile_model(module, cfg.compile)  # before the exchange registers its hooks
    # the blocks the model declares, checkpointed (ZeRO-3 gathers each as one unit)
    blocks = agree(world.comm, lambda: declared_units(module, cfg.model,
                                                      cfg.activation_checkpointing))
    units = zero3_units_around(module, blocks) if blocks else None
    # ZeRO (--shard, docs/sharding.md): the optimizer is built over this rank's shards
    model = (partial(build_sharded, units=units) if cfg.shard != "none" else build_exchange)(
        BuildContext(
            cfg, world, module, device, steps_per_epoch,
            make_reducer=lambda overlap: build_reducer(cfg, world, device, overlap),
            link=ps_link,
        )
    )
    params = model.parameters() if isinstance(model, ShardedDataParallel) else module.parameters()
    optimizer = build_optimizer(cfg, params, world.size)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    steps = ClassifierSteps(model, device, world.comm, precision=cfg.precision, scaler=scaler)
    return Parts(model, optimizer, scheduler, train_loader, test_loader, device, steps, scaler)


def _flag(name: str, value: object) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def with_mode_defaults(cfg: TrainConfig, ranks: int, *, announce: bool) -> TrainConfig:
    """Apply ``cfg.exchange``'s tuned hyperparameters to the options the user did not set.

    Also refuses options of other modes (``mpitrain.grad.protocol.mode_options``). ``ranks``
    is the number of ranks launched. With ``announce`` the changes are printed (and how to
    turn them off).
    """
    from mpitrain.grad.protocol import mode_options, tuned_changes

    mode_options(cfg)
    changes = tuned_changes(cfg, ranks)
    if not changes:
        return cfg
    if announce:
        text = ", ".join(_flag(k, v) for k, v in sorted(changes.items()))
        print_line(
            f"mpitrain: --exchange {cfg.exchange} defaults: {text} "
            "(set them to override, or --no-mode-defaults)"
        )
    return cfg.replace(**changes)


def with_gpt_defaults(cfg: TrainConfig, *, announce: bool) -> TrainConfig:
    """Apply the built-in GPT's defaults (``mpitrain.train.gpt.DEFAULTS``) to unset options."""
    from mpitrain.train.gpt import gpt_defaults

    changes = gpt_defaults(cfg)
    if changes and announce:
        text = ", ".join(_flag(k, v) for k, v in sorted(changes.items()))
        print_line(f"mpitrain: --model {cfg.model} defaults: {text} (set them to override, or "
                   "--no-mode-defaults)")
    return cfg.replace(**changes) if changes else cfg


def resume_if_asked(cfg: TrainConfig, trainer: Trainer, plan: ckpt.RunPlan) -> None:
    """Collective: take the run's id from ``plan``, then load the checkpoint it names, if any.

    ``plan`` comes from :func:`mpitrain.checkpoint.plan_run`, called before any data is opened:
    a fresh run in a --checkpoint-dir that holds checkpoints, or a resumed one in a directory
    of another run, is refused there on every rank.
    """
    directory = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    trainer.cfg = trainer.cfg.replace(run_id=plan.run_id)
    info = plan.resume_from
    if info is None:
        if trainer.world.rank == 0 and cfg.resume is not None:
            log.info("no usable checkpoint in %s: run %s starts fresh", directory, plan.run_id)
        elif trainer.world.rank == 0 and directory is not None:
            log.info("run %s: checkpoints go to %s", plan.run_id, directory)
        return
    state = agree(trainer.comm, lambda: ckpt.load_of_run(info, plan.run_id))
    trainer.load_state_dict(state, origin=info.path.parent, source=info.path)
    if directory is not None and info.path.resolve().parent == directory.resolve():
        trainer.last_saved_step = trainer.state.step  # that file is there: not written again
    if trainer.p.model.replicas_identical() and trainer.cfg.shard == "none":
        # (ZeRO: each rank holds its own optimizer shard; the shard files carry checksums)
        digest = ckpt.state_digest(trainer.p.model.module, trainer.p.optimizer)
        ckpt.check_same_everywhere(trainer.comm, digest, f"loading '{info.path}'")
    # local SGD between averages: each rank restored its own saved model, which differ by design
    if trainer.world.rank == 0:
        run = info.run_id or f"unknown (format 1), continued as {plan.run_id}"
        print_line(
            f"mpitrain: resumed from {info.path} (step {trainer.state.step}, run {run}, "
            f"{info.when}; saved by {state['world_size']} ranks, now {trainer.world.size})"
        )


def main(argv: list[str], comm: MPI.Intracomm, *, preempt: PreemptFlag | None = None) -> int:
    """Collective: run the train command on ``comm``; returns the process exit code.

    The configuration is resolved once, for the ranks launched; then the exchange mode's own
    role split runs before any trainer is built (``--exchange param-server``: the last
    ``--servers`` ranks serve parameters, the others train on a workers-only communicator),
    and the ranks that train run :func:`train`. ``preempt`` is the flag the entry point
    installed at process start (so a signal during start-up, data loading or resume is
    recorded, not fatal); a new one is installed if None.
    """
    t_start = time.perf_counter()
    cfg = parse_config(argv)
    if cfg.model in LANGUAGE_MODELS:
        cfg = with_gpt_defaults(cfg, announce=comm.rank == 0)
    cfg = with_mode_defaults(cfg, comm.size, announce=comm.rank == 0)
    note = lr_note(cfg, comm.size)
    if note and comm.rank == 0:
        print_line(note)
    flag = preempt if preempt is not None else PreemptFlag([]).install()
    flag.switch(parse_signals(cfg.preempt_signals))
    check_slurm_world(comm.size)  # srun without PMI starts N worlds of size 1: say so
    launch = get_mode(cfg.exchange).launch  # the mode's own role split (param-server)

    def start(c: MPI.Intracomm, faults: FaultDomain | None = None,
              handoff: Handoff | None = None) -> int:
        """Collective: train on world ``c`` (the mode's role split first, if it has one)."""
        world = World.create(c)
        if launch is None:
            return train(cfg, world, flag, t_start, faults=faults, handoff=handoff)
        from mpitrain.train.optim import build_optimizer

        return int(launch(
            cfg, world,
            lambda wcomm, link: train(cfg, World.create(wcomm), flag, t_start, ps_link=link,
                                      faults=faults, handoff=handoff),
            lambda params: build_optimizer(cfg, params, 1), flag,
        ))

    try:
        if cfg.on_rank_loss == "shrink":  # go on without a lost rank (train/recover.py)
            from mpitrain.train.recover import survive

            return survive(cfg, comm, start)
        return start(comm)
    finally:
        flag.uninstall()


def train(cfg: TrainConfig, world: World, flag: PreemptFlag, t_start: float, *,
          ps_link: Any = None, faults: FaultDomain | None = None,
          handoff: Handoff | None = None) -> int:
    """Collective (the ranks that train): build the parts and the one Trainer, fit, report.

    ``ps_link``: a param-server worker's link to the servers (None otherwise). ``faults``:
    the fault domain of ``--on-rank-loss shrink``; ``handoff``: what a shrunk world
    continues from (train/recover.py).
    """
    setup_logging(world.rank, cfg.log_level)
    # before any data is opened: refuse another run's checkpoint directory on every rank
    resume = "auto" if handoff is not None and cfg.checkpoint_dir else cfg.resume
    plan = ckpt.plan_run(world.comm, resume, Path(cfg.checkpoint_dir) if cfg.checkpoint_dir
                         else None)
    check_timeline_path(world.comm, cfg.timeline)  # rank 0 writes it at the end: usable?
    device = choose_device(cfg, world)
    watchdog = Watchdog.create(world.comm, cfg.hang_timeout, io_timeout=cfg.io_timeout)
    try:
        with watchdog.guard("opening the data and building the model", io=True):
            spec = agree(world.comm, lambda: resolve_seeded(cfg)) if (
                cfg.model in LANGUAGE_MODELS or ":" in cfg.model) else None
            if spec is not None and not isinstance(spec, ClassifierSpec):
                # a language model: a tensor x pipeline x data grid (docs/model-parallel.md)
                from mpitrain.train.grid import build_grid_parts

                parts = build_grid_parts(
                    cfg, world, device, lambda w, overlap: build_reducer(cfg, w, device, overlap),
                    spec)
            else:
                check_classifier(cfg, spec)
                parts = build_parts(cfg, world, device, ps_link, spec)
        trainer = Trainer(cfg, world, parts, watchdog=watchdog)
        # the per-step gate where replicas must stay equal (sync; the others reload a checkpoint)
        trainer.faults = faults if cfg.exchange == "sync" else None
        t_built = time.time()
        trainer.samples.begin(world.comm)  # collective: this incarnation's --sample-log lines
        timeline = start_timeline(world.comm, cfg.timeline, cfg.timeline_steps)  # collective
        trainer.timeline = timeline.recorder
        parts.steps.set_timeline(timeline.recorder)
        parts.model.set_timeline(timeline.recorder)  # bucket spans where the exchange has them
        with watchdog.guard("resume: loading the checkpoint", io=True):
            if handoff is not None and handoff.state is not None:
                trainer.cfg = trainer.cfg.replace(run_id=plan.run_id)  # (a checkpoint's id)
                continue_from(trainer, handoff)  # the kept step, from memory
            else:
                resume_if_asked(cfg, trainer, plan)
            if handoff is not None and world.rank == 0:
                handoff.timings.update(rebuild=t_built - handoff.timings["shrunk_unix"],
                                       reload=time.time() - t_built)
                report(handoff, world.size, trainer.state.step, "kept in memory"
                       if handoff.state is not None
                       else f"checkpoint {plan.resume_from.path}" if plan.resume_from
                       else "no checkpoint: from the start")
        if world.rank == 0:
            log.info(
                "%s; %d ranks on %d node(s); device %s",
                cfg.model, world.size, world.num_nodes, device,
            )
        try:
            code = trainer.fit(flag)
            timeline.stop()  # collective: merge on rank 0 (also after an agreed preemption)
            parts.model.close()  # collective: in-flight traffic finished, communicators freed
        except BaseException as exc:
            lost = failure(trainer, exc) if faults is not None else None
            if lost is not None:
                raise lost from exc  # the survivors shrink and go on (train/recover.py)
            raise
        finally:
            trainer.metrics.close()
            trainer.samples.close()
    finally:
        watchdog.close()
    if code != 0:
        return code
    cfg = trainer.cfg  # with the run id
    st = trainer.state
    summary = {
        "world_size": world.size,
        "epochs": st.epoch,
        "steps": st.step,
        "final_loss": st.last_train_loss,
        "test_loss": st.last_eval.get("test_loss"),
        "test_accuracy": st.last_eval.get("test_accuracy"),
        "test_perplexity": st.last_eval.get("test_perplexity"),
        "grid": {"tensor": cfg.tensor_parallel, "pipeline": cfg.pipeline_stages,
                 "data": world.size // (cfg.tensor_parallel * cfg.pipeline_stages)},
        "samples_per_sec": st.samples_total / st.train_seconds if st.train_seconds else 0.0,
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": st.train_seconds,
        "data_wait_frac": trainer.data_wait / st.train_seconds if st.train_seconds else 0.0,
        "comm_frac": trainer.comm_wait / st.train_seconds if st.train_seconds else 0.0,
        "config": cfg.to_dict(),
    }
    if world.rank == 0:
        print_line(summary_line(summary))
        if cfg.summary_json:
            write_summary(Path(cfg.summary_json), summary)
        if cfg.run_dir:
            write_summary(Path(cfg.run_dir) / "summary.json", summary)
        done = env.get("done_file")  # training finished: what a job script checks
        if done:
            write_summary(Path(done), summary)
    return 0
