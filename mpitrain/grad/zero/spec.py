"""Build ShardedDataParallel for the trainer (``--shard optimizer|gradients|parameters``).

The trainer's checkpoints (``mpitrain.train.zero_ckpt``), clipping and bf16 autocast work with
sharding; fp16 (its loss scaler), device parameters and the asynchronous modes do not yet, so
those combinations are refused here, with the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.zero.wrapper import STAGES, ShardedDataParallel

if TYPE_CHECKING:
    from mpitrain.grad.protocol import BuildContext


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
    if cfg.precision == "fp16":
        refuse.append(f"--precision {cfg.precision}")
    if ctx.device.type != "cpu":
        refuse.append(f"--device {ctx.device.type}")
    if refuse:
        raise ConfigError(with_hint(
            f"--shard {shard} does not work with {', '.join(refuse)} yet",
            "drop those options, or use --shard none; scripts can use "
            "mpitrain.ShardedDataParallel with save_sharded/clip_grad_norm_ (docs/sharding.md)",
        ))
    return stage


def build_sharded(ctx: BuildContext) -> ShardedDataParallel:
    """Collective: wrap ``ctx.module`` for ``--shard`` (build the optimizer over its shards)."""
    stage = check_trainer_options(ctx)
    return ShardedDataParallel(ctx.module, comm=ctx.world.comm, stage=stage,
                               bucket_mb=ctx.cfg.bucket_mb, compression=ctx.cfg.compression)
