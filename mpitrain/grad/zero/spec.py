"""Build ShardedDataParallel for the trainer (``--shard optimizer|gradients|parameters``).

The trainer's checkpoints (``mpitrain.grad.zero.checkpoint``), clipping, bf16 autocast, fp16 with
its loss scaler (inf/nan agreed over the shards) and device parameters (CUDA-aware or staged,
flat or hierarchical, as ``--allreduce`` and ``--cuda-aware`` say) work with sharding; the
asynchronous modes and error feedback do not, so those are refused here, with the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mpitrain.comm.threaded import resolve_progress
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.zero.wrapper import STAGES, ShardedDataParallel
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    import torch

    from mpitrain.grad.protocol import BuildContext

log = logging.getLogger("mpitrain")


def check_trainer_options(ctx: BuildContext) -> int:
    """Return the ZeRO stage for ``ctx.cfg.shard``, refusing what the trainer cannot shard."""
    cfg = ctx.cfg
    shard = str(getattr(cfg, "shard", "none"))
    stage = STAGES.get(shard)
    if stage is None:
        raise ConfigError(with_hint(f"--shard {shard} is not available",
                                    "use --shard none, optimizer, gradients or parameters"))
    refuse = []
    if cfg.exchange != "sync":
        refuse.append(f"--exchange {cfg.exchange}")
    if cfg.compression.endswith("-ef"):
        refuse.append(f"--compression {cfg.compression} (error feedback needs the full "
                      "gradient on every rank)")
    if refuse:
        raise ConfigError(with_hint(
            f"--shard {shard} does not work with {', '.join(refuse)} yet",
            "drop those options, or use --shard none; scripts can use "
            "mpitrain.ShardedDataParallel with save_sharded/clip_grad_norm_ (docs/sharding.md)",
        ))
    return stage


def build_sharded(ctx: BuildContext, units: Sequence[torch.nn.Module] | None = None,
                  ) -> ShardedDataParallel:
    """Collective: wrap ``ctx.module`` for ``--shard`` (build the optimizer over its shards).

    ``units``: stage 3's gather units (default: the module's parameter-holding children).
    """
    from mpitrain.comm.factory import describe_shards
    from mpitrain.runtime.cuda_aware import decide_cuda_aware

    stage = check_trainer_options(ctx)
    cfg, world = ctx.cfg, ctx.world
    aware = False
    if ctx.device.type == "cuda":
        aware = decide_cuda_aware(world.comm, ctx.device, cfg.cuda_aware).use_cuda_aware
    progress = agree(world.comm, lambda: resolve_progress(cfg.comm_progress))
    model = ShardedDataParallel(ctx.module, comm=world.comm, stage=stage,
                                bucket_mb=cfg.bucket_mb, compression=cfg.compression,
                                algo=cfg.allreduce, cuda_aware=aware, world=world, units=units,
                                progress=progress)
    if world.rank == 0:
        log.info("shard transport: %s", describe_shards(model.transport))
    return model
