"""fp16 loss scaling under MPIStrategy: Lightning's MixedPrecision step with the overflow
found alike on every rank.

Lightning's ``MixedPrecision.optimizer_step`` runs the closure (forward, backward and, here,
the gradient exchange), ``scaler.unscale_``, ``on_before_optimizer_step`` and clipping, then
``scaler.step`` (skipped on inf/nan) and ``scaler.update`` (backs the scale off after a
skip). Under ZeRO each rank holds only its shard of the averaged gradient, so each
GradScaler would look for inf/nan in its own shard: the rank whose shard overflowed would
skip the step and halve its scale while the others stepped. :func:`scaled_optimizer_step` is
the same sequence with the unscale done by the exchange (``ExchangeBase.unscale_``; under
ZeRO one logical-OR all-reduce over the shards, the agreed overflow planted in this rank's
shard before ``scaler.unscale_``), so every rank's scaler skips, or steps, and backs off
alike. The plugin, its scaler and its checkpoint entry (``MixedPrecision``) stay Lightning's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import Precision

    from mpitrain.grad.protocol import ExchangeBase


def routes_scaler(plugin: Precision) -> bool:
    """Whether ``plugin`` is Lightning's MixedPrecision step with a GradScaler (fp16), the one
    :func:`scaled_optimizer_step` replaces (not collective)."""
    return isinstance(plugin, MixedPrecision) and plugin.scaler is not None and \
        type(plugin).optimizer_step is MixedPrecision.optimizer_step


def check_plugin(plugin: Precision, stage: int) -> None:
    """Refuse, under ZeRO, a precision plugin with a GradScaler whose own ``optimizer_step``
    the strategy cannot route through the exchange (one line, with the fix).

    Decided from the Trainer's plugin, which is the same on every rank.
    """
    if not stage or getattr(plugin, "scaler", None) is None or routes_scaler(plugin):
        return
    raise ConfigError(with_hint(
        f"MPIStrategy(shard=...) with the precision plugin {type(plugin).__name__}: its own "
        "optimizer_step unscales with its GradScaler, which sees only this rank's shard of "
        "the gradient (one rank would skip a step alone)",
        "use precision='16-mixed' (Lightning's MixedPrecision, agreed over the shards by "
        "MPIStrategy), 'bf16-mixed' (no loss scaling), or shard='none'"))


def scaled_optimizer_step(
    plugin: MixedPrecision, exchange: ExchangeBase, optimizer: torch.optim.Optimizer,
    model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any,
) -> Any:
    """Collective: ``MixedPrecision.optimizer_step`` with the unscale done by ``exchange``.

    Unscaled here also for optimizers that would unscale inside their own step (fused): the
    overflow must be agreed before the step. Returns what ``scaler.step`` returns (or the
    closure's result when backward was skipped, as Lightning does).
    """
    scaler = plugin.scaler
    assert scaler is not None
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError(with_hint(
            "precision='16-mixed' (loss scaling) does not work with the LBFGS optimizer "
            "(Lightning's rule)", "use another optimizer, or precision='bf16-mixed'"))
    closure_result = closure()
    # training_step returned None: Lightning skipped backward, so there is nothing to unscale
    skip_unscaling = closure_result is None and model.automatic_optimization
    if not skip_unscaling:
        exchange.unscale_(optimizer, scaler)
    plugin._after_closure(model, optimizer)  # on_before_optimizer_step, gradient clipping
    if skip_unscaling:
        return closure_result
    step_output = scaler.step(optimizer, **kwargs)  # skipped on every rank alike
    scaler.update()
    return step_output
