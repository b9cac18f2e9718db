"""Optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mpitrain.config import TrainConfig
from mpitrain.config_checks import explicit_options
from mpitrain.config_values import OPTIMIZER_DEFAULTS
from mpitrain.errors import ConfigError, with_hint


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Samples per optimizer step over all ranks: ``--global-batch``, else
    ``batch-size x ranks x accumulate``."""
    return cfg.global_batch or cfg.batch_size * world_size * cfg.accumulate


def rank_batch(cfg: TrainConfig, world_size: int) -> int:
    """Samples per rank per micro-batch: ``--batch-size``, or with ``--global-batch G``
    ``G / (ranks x accumulate)`` (ConfigError when it does not divide)."""
    if not cfg.global_batch:
        return cfg.batch_size
    per = world_size * cfg.accumulate
    if cfg.global_batch % per:
        raise ConfigError(with_hint(
            f"--global-batch {cfg.global_batch} does not divide by {world_size} ranks x "
            f"--accumulate {cfg.accumulate}",
            f"use a multiple of {per} (for 2, 3 or 4 ranks a multiple of "
            f"{12 * cfg.accumulate})"))
    return cfg.global_batch // per


def base_lr(cfg: TrainConfig, world_size: int) -> float:
    """Return the peak lr: ``cfg.lr``, with --scale-lr grown by the optimizer's scaling rule.

    ``cfg.lr`` is meant for a batch of ``--batch-size`` samples. SGD's rule is linear: N ranks
    each accumulating K micro-batches use ``lr * N * K``; Adam's is the square root,
    ``lr * sqrt(N * K)`` (``OPTIMIZER_DEFAULTS``). With ``--global-batch G`` the ratio is
    ``G / batch-size`` whatever the number of ranks (elastic runs keep the lr).
    """
    if not cfg.scale_lr:
        return cfg.lr
    ratio = global_batch(cfg, world_size) / cfg.batch_size
    return cfg.lr * OPTIMIZER_DEFAULTS[cfg.optimizer].factor(ratio)


def lr_note(cfg: TrainConfig, world_size: int) -> str | None:
    """Say which default lr ``--optimizer`` chose when ``--lr`` was not given (None otherwise).

    SGD's is the plain default; another optimizer's is announced like the exchange modes'
    tuned defaults.
    """
    default = OPTIMIZER_DEFAULTS[cfg.optimizer]
    if cfg.optimizer == "sgd" or "lr" in explicit_options(cfg) or cfg.lr != default.lr:
        return None
    scaled = (f", {default.scaling} scaling to {base_lr(cfg, world_size):.4g} at global batch "
              f"{global_batch(cfg, world_size)}" if cfg.scale_lr else "")
    return (f"mpitrain: --optimizer {cfg.optimizer} defaults: --lr {default.lr:g} for "
            f"{cfg.batch_size} samples{scaled} (set --lr to override)")


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter], world_size: int
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.optimizer``."""
    lr = base_lr(cfg, world_size)
    plist = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            plist,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(plist, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(plist, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Return the lr multiplier at optimizer step ``step`` (warm-up, then decay)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.lr_schedule == "step":
        return float(0.1 ** (step // max(1, cfg.step_every * steps_per_epoch)))
    return 1.0


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Build a per-step scheduler applying :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch)
    )
