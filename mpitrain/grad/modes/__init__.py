"""Opt-in asynchronous gradient-exchange modes (``--exchange``): see docs/async.md.

* ``local-sgd``: :class:`~mpitrain.grad.modes.local_sgd.LocalSGD`
* ``double-buffer``: :class:`~mpitrain.grad.modes.double_buffer.DoubleBuffer`
* ``param-server``: :mod:`mpitrain.grad.modes.param_server` (servers + worker client)

Importing this package does no MPI work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime import env

if TYPE_CHECKING:
    import torch

    from mpitrain.config import TrainConfig
    from mpitrain.runtime.world import World


def _float_env(key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        name = env.TABLE[key][0]
        raise ConfigError(with_hint(f"{name}={raw!r} is not a number", f"unset {name}")) from None


def wrap_for_mode(
    cfg: TrainConfig,
    world: World,
    module: torch.nn.Module,
    reducer: Any = None,
    *,
    steps_per_epoch: int = 1,
    link: Any = None,
) -> Any:
    """Collective: wrap ``module`` for ``cfg.exchange`` (any mode except ``sync``).

    Args:
        cfg: the run's config (exchange, local_steps, warmup_epochs, max_staleness).
        world: the ranks that train (for param-server: the workers only).
        module: the model.
        reducer: the engine's transport (unused by these modes; kept for a uniform call).
        steps_per_epoch: optimizer steps per epoch (local SGD's warm-up is the lr warm-up).
        link: param-server only: the worker's :class:`~.param_server.ServerLink`.
    """
    del reducer
    if cfg.exchange == "local-sgd":
        from mpitrain.grad.modes.local_sgd import LocalSGD

        warmup = env.get_int("local_sgd_warmup")
        if warmup is None:
            warmup = int(cfg.warmup_epochs * steps_per_epoch)
        return LocalSGD(
            module,
            world.comm,
            local_steps=cfg.local_steps,
            warmup_steps=warmup,
            average_optimizer_state=env.get("local_sgd_average_optimizer", "0") == "1",
        )
    if cfg.exchange == "double-buffer":
        from mpitrain.grad.modes.double_buffer import DoubleBuffer

        return DoubleBuffer(
            module,
            world.comm,
            progress=env.get("double_buffer_progress", "poll") or "poll",
            delay_compensation=_float_env("delay_compensation", 0.0),
        )
    if cfg.exchange == "param-server":
        from mpitrain.grad.modes.param_server import ParamServerWorker

        if link is None:
            raise ConfigError(
                with_hint(
                    "--exchange param-server needs the server ranks set up first",
                    "run through `python -m mpitrain` (it calls run_param_server)",
                )
            )
        return ParamServerWorker(module, world.comm, link, max_staleness=cfg.max_staleness)
    raise ConfigError(with_hint(f"exchange mode {cfg.exchange!r} has no wrapper", "use sync"))
