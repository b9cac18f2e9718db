"""``--exchange param-server``'s registry row: options, builder, lag, tuned defaults.

The mechanics (servers, worker client, role split) are in :mod:`.param_server`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.modes.param_server import run_param_server
from mpitrain.grad.modes.param_server_worker import ParamServerWorker
from mpitrain.grad.protocol import BuildContext, ModeSpec

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig


@dataclass(frozen=True)
class ParamServerOptions:
    """``--exchange param-server``'s options (TrainConfig fields of the same names)."""

    servers: int = 1
    max_staleness: int = 0
    sync_warmup_steps: int | None = None  #: None: the lr warm-up's steps

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ParamServerOptions:
        """Take the options from ``cfg``; refuse transports that do not apply to it."""
        if cfg.compression != "none":
            raise ConfigError(
                with_hint(
                    f"--compression {cfg.compression} does not apply to --exchange param-server "
                    "(workers and servers exchange float32 shards point-to-point)",
                    "drop --compression, or use --exchange sync/double-buffer/local-sgd",
                )
            )
        return cls(cfg.servers, cfg.max_staleness, cfg.sync_warmup_steps)


def _build(ctx: BuildContext, opts: ParamServerOptions) -> ParamServerWorker:
    if ctx.link is None:
        raise ConfigError(
            with_hint(
                "--exchange param-server needs the server ranks set up first",
                "run through `python -m mpitrain` (its launch splits servers from workers)",
            )
        )
    warmup = opts.sync_warmup_steps
    if warmup is None:
        warmup = int(ctx.cfg.warmup_epochs * ctx.steps_per_epoch)
    return ParamServerWorker(
        ctx.module, ctx.world.comm, ctx.link, max_staleness=opts.max_staleness,
        warmup_steps=warmup,
    )


#: staleness in samples the tuned defaults allow: τ × global batch (double-buffer: 1 × 64)
TUNED_STALE_SAMPLES = 64


def _tuned(cfg: TrainConfig, ranks: int) -> dict[str, Any]:
    if cfg.max_staleness == 0:
        return {}  # synchronous SGD: the sync defaults
    # τ versions of staleness bound the stable lr whatever the batch (docs/async.md: plain
    # SGD lr·λ < 0.62 at τ = 2, 0.35 at τ = 4; momentum no longer helps): plain SGD at one
    # fixed lr, no linear scaling, and a global batch of 64 / τ samples, so that parameters
    # are never more than 64 samples stale and the run takes τ times more, smaller steps.
    workers = max(ranks - cfg.servers, 1)
    batch = max(4, TUNED_STALE_SAMPLES // (cfg.max_staleness * workers))
    return {"momentum": 0.0, "lr": 0.2, "scale_lr": False, "batch_size": batch}

SPEC = ModeSpec(
    name="param-server",
    options=ParamServerOptions.from_config,
    build=_build,
    lag=lambda opts: opts.max_staleness,
    fields=("servers", "max_staleness", "sync_warmup_steps"),
    tuned=_tuned,
    launch=run_param_server,
)
