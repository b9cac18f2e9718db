"""The gradient exchange under a LightningModule: mpitrain's engine or ZeRO, built for a fit.

``shard="none"`` wraps the module in :class:`mpitrain.DataParallel` (buckets, overlap with
backward, compression hooks, the flat / hierarchical / staged / CUDA-aware transport chosen
as the trainer's ``--allreduce`` and ``--cuda-aware`` choose it); ``optimizer``,
``gradients`` and ``parameters`` wrap it in :class:`ShardedDataParallel` at stage 1, 2 or 3
and point the user's optimizer (built by ``configure_optimizers`` over the module's
parameters) at this rank's shards instead, in place, so LR schedulers keep their optimizer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.parallel import DataParallel
from mpitrain.grad.protocol import ExchangeBase
from mpitrain.grad.zero.wrapper import ShardedDataParallel

if TYPE_CHECKING:
    from mpitrain.lightning.options import MPIOptions
    from mpitrain.runtime.world import World

log = logging.getLogger("mpitrain")


def build_exchange(
    module: torch.nn.Module, world: World, device: torch.device, opts: MPIOptions
) -> ExchangeBase:
    """Collective: wrap ``module`` for data-parallel training as ``opts`` say.

    Wrapping checks every rank holds the same parameter layout and broadcasts rank 0's
    parameters and buffers (so every rank starts from the same weights).
    """
    from mpitrain.comm.factory import describe, describe_shards, make_reducer
    from mpitrain.grad.hooks import make_hook
    from mpitrain.runtime.cuda_aware import decide_cuda_aware

    decision = decide_cuda_aware(world.comm, device, opts.cuda_aware)
    if opts.stage:
        sharded = ShardedDataParallel(
            module, comm=world.comm, stage=opts.stage, bucket_mb=opts.bucket_mb,
            compression=opts.compression, algo=opts.allreduce,
            cuda_aware=decision.use_cuda_aware, world=world)
        if world.rank == 0:
            log.info("MPIStrategy: %s; transport %s", sharded.describe(),
                     describe_shards(sharded.transport))
        return sharded
    reducer = make_reducer(world, device=device, cuda_aware=decision, algo=opts.allreduce)
    model = DataParallel(module, comm=world.comm, bucket_mb=opts.bucket_mb,
                         hook=make_hook(opts.compression), reducer=reducer)
    if world.rank == 0:
        log.info("MPIStrategy: DataParallel %s; transport %s", model.engine.describe(),
                 describe(reducer))
    return model


def shard_optimizers(
    optimizers: list[torch.optim.Optimizer], model: ShardedDataParallel,
    module: torch.nn.Module,
) -> None:
    """Point the one optimizer over ``module``'s parameters at ``model``'s shards, in place.

    Raises:
        ConfigError: several optimizers or param groups, or an optimizer that does not hold
            exactly the module's trainable parameters (one line, with the fix).
    """
    if len(optimizers) != 1:
        raise ConfigError(with_hint(
            f"MPIStrategy(shard=...) needs exactly one optimizer, configure_optimizers "
            f"returned {len(optimizers)}", "return one optimizer, or use shard='none'"))
    opt = optimizers[0]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    held = [p for g in opt.param_groups for p in g["params"]]
    if len(opt.param_groups) != 1 or {id(p) for p in held} != trainable or len(held) != len(
            trainable):
        raise ConfigError(with_hint(
            f"MPIStrategy(shard=...) shards one optimizer over all trainable parameters in one "
            f"param group; {type(opt).__name__} has {len(opt.param_groups)} group(s) over "
            f"{len(held)} of the module's {len(trainable)} trainable parameters",
            "build it as torch.optim.X(self.parameters(), ...) in configure_optimizers, or "
            "use shard='none' for per-layer groups"))
    if opt.state:
        raise ConfigError(with_hint(
            f"{type(opt).__name__} already holds state before the first step",
            "create the optimizer in configure_optimizers and let the checkpoint restore it"))
    opt.param_groups[0]["params"] = list(model.shards)


def refuse_unsupported(stage: int, *, clip_norm: bool, layer_sync: bool) -> None:
    """Refuse what would silently train wrong under this exchange (one line, with the fix).

    Decided from the Trainer's settings, which are the same on every rank (fp16 loss scaling:
    :mod:`mpitrain.lightning.precision`).
    """
    if layer_sync:
        raise ConfigError(with_hint(
            "Trainer(sync_batchnorm=True) needs torch.distributed, which MPIStrategy does not "
            "start", "drop sync_batchnorm: mpitrain broadcasts BatchNorm statistics from rank "
            "0 after each step (as DDP does), or use strategy='ddp'"))
    if not stage:
        return
    if clip_norm:
        raise ConfigError(with_hint(
            "Trainer(gradient_clip_val=..., gradient_clip_algorithm='norm') with "
            "MPIStrategy(shard=...) would clip each rank's shard by its own norm",
            "override LightningModule.configure_gradient_clipping and call "
            "self.trainer.strategy.clip_grad_norm_(max_norm) (the global norm), or clip "
            "by value"))


def unwrap(model: ExchangeBase, *, collective: bool) -> None:
    """Collective (with ``collective``): detach the exchange from its module, free its
    communicators.

    Stage 3's parameters get their full values back (gathered, then owned by the module), so
    the module can be evaluated, tested or saved after the fit. Without ``collective`` (a
    failed rank: the others may not come) nothing is done: the job is ending.
    """
    if not collective:
        return  # this rank failed: the job ends (aborted or agreed); nothing to give back
    module = model.module
    if isinstance(model, ShardedDataParallel):
        with model.gathered(), torch.no_grad():
            for p in module.parameters():
                p.data = p.data.clone()
        model.close()
        for p in module.parameters():
            p.grad = None  # stage 1's are views of a reduce-scattered buffer
    elif isinstance(model, DataParallel):
        model.engine.remove_hooks()
