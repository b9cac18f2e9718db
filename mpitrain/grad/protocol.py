"""The contract between the trainer and every way of exchanging gradients, and its registry.

The trainer (``mpitrain.train.loop``) drives one object per rank, an :class:`Exchange`:
``DataParallel`` (sync), the asynchronous modes under ``mpitrain/grad/modes`` and the
sharded / model-parallel wrappers. Per step it calls::

    with model.no_sync():            # all micro-batches but the last (no communication)
        model(x).backward()
    model(x).backward()
    model.synchronize()              # Collective: this step's gradient exchange
    model.step(optimizer)            # Collective for some modes: apply the update
    model.after_step()               # Collective for some modes (local SGD's average)
    model.zero_grad()

and around it ``drain()`` before evaluating or checkpointing, ``exchange_state_dict()`` /
``load_exchange_state_dict()`` in checkpoints, ``replicas_identical()`` after a resume and
``close()`` at the end. Communication happens only in methods whose docstring begins with
"Collective:"; ``train()`` / ``eval()``, ``metrics()`` and ``replicas_identical()`` never
communicate.

A mode is registered by one row of :data:`MODES` (name -> ``"module:ATTRIBUTE"`` of its
:class:`ModeSpec`); the spec names its option dataclass, how to build it from a
``TrainConfig``, its builder, its step-agreement lag and its tuned hyperparameter defaults.
``--exchange`` choices (``mpitrain.config``, a lower layer that cannot import this one) are
checked against this table by a unit test.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from mpitrain.checkpoint.payload import ReplicatedState, StateIO
from mpitrain.config_checks import explicit_options
from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpitrain.comm.reducer import Reducer
    from mpitrain.config import TrainConfig
    from mpitrain.grad.autotune import HasEngine
    from mpitrain.runtime.world import World
    from mpitrain.timeline.recorder import Timeline


@runtime_checkable
class Exchange(Protocol):
    """What the trainer drives: a model wrapper that owns the gradient exchange of one rank."""

    module: torch.nn.Module  #: the wrapped model (its ``state_dict`` is the checkpoint's model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the forward pass of the wrapped module (no communication)."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Switch train/eval mode (no communication: call :meth:`drain` first when needed)."""
        ...

    def eval(self) -> Any:
        """Switch to eval mode (no communication)."""
        ...

    def no_sync(self) -> AbstractContextManager[None]:
        """Accumulate gradients locally for the backward passes inside (no communication)."""
        ...

    def synchronize(self) -> None:
        """Collective: finish (or start) this step's gradient exchange after backward."""
        ...

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective: apply this step's update (``optimizer.step()`` or the mode's own)."""
        ...

    def unscale_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective: fp16: ``scaler.unscale_(optimizer)``, inf/nan found the same on every
        rank (sharded gradients: agreed over the shards)."""
        ...

    def scaled_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Collective: fp16: ``scaler.step(optimizer)`` (skipped on inf/nan), ``scaler.update()``,
        then what :meth:`step` does after the optimizer (e.g. gather ZeRO's parameters)."""
        ...

    def after_step(self) -> None:
        """Collective: run after the update (e.g. local SGD's periodic model average)."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped module's gradients (no communication)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Return this step's statistics for the metrics record (no communication)."""
        ...

    def replicas_identical(self) -> bool:
        """Whether every rank should hold the same parameters now (no communication)."""
        ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients to a global 2-norm of at most ``max_norm``; return the norm.

        Collective where gradients are sharded (ZeRO): the norm is of the whole model.
        """
        ...

    def drain(self) -> None:
        """Collective: finish in-flight traffic so the module holds the newest parameters."""
        ...

    def exchange_state_dict(self) -> dict[str, Any] | None:
        """Collective: the exchange's own state for a checkpoint (None when it has none).

        Called on every rank; rank 0's return value is stored.
        """
        ...

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Collective: restore what :meth:`exchange_state_dict` returned (on every rank)."""
        ...

    def close(self) -> None:
        """Collective: finish all traffic and free the exchange's communicators and threads."""
        ...

    def set_timeline(self, recorder: Timeline) -> None:
        """Record this exchange's communication spans into ``recorder`` (no communication)."""
        ...

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> StateIO:
        """How this exchange's model and optimizer state is checkpointed (no communication)."""
        ...

    def bucket_engine(self) -> HasEngine | None:
        """The wrapper whose gradient buckets ``--bucket-mb auto`` resizes (None: none)."""
        ...


class ExchangeBase(torch.nn.Module):
    """Defaults for an :class:`Exchange` that is an ``nn.Module`` holding ``self.module``.

    Subclasses override what their mode does; every default is local (no communication).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate locally (the default exchange communicates only at the step boundary)."""
        yield

    def synchronize(self) -> None:
        """Collective: finish this step's gradient exchange (default: nothing to do)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective: apply the update (default: ``optimizer.step()``, local)."""
        optimizer.step()

    def unscale_(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Unscale (default: every rank holds the same averaged gradients, so the same inf)."""
        scaler.unscale_(optimizer)

    def scaled_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        """Step through the scaler (default: nothing else to do)."""
        scaler.step(optimizer)
        scaler.update()

    def after_step(self) -> None:
        """Collective: run after the update (default: nothing)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped module's gradients."""
        self.module.zero_grad(set_to_none=set_to_none)

    def metrics(self) -> dict[str, float]:
        """Return per-step statistics (default: none)."""
        return {}

    def replicas_identical(self) -> bool:
        """Whether every rank should hold the same parameters now (default: yes)."""
        return True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the module's gradients (default: identical on every rank after the exchange,
        so is the norm; no communication)."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def drain(self) -> None:
        """Collective: finish in-flight traffic (default: none in flight)."""

    def exchange_state_dict(self) -> dict[str, Any] | None:
        """Collective: the exchange's own checkpoint state (default: none)."""
        return None

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Collective: restore the exchange's own state (default: nothing to restore)."""
        del state

    def close(self) -> None:
        """Collective: finish traffic and free resources (default: :meth:`drain`)."""
        self.drain()

    def set_timeline(self, recorder: Timeline) -> None:
        """Record communication spans into ``recorder`` (default: the trainer's phases only)."""
        del recorder

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> StateIO:
        """Replicated state: the module's and the optimizer's state dicts, in the file."""
        return ReplicatedState(self.module, optimizer)

    def bucket_engine(self) -> HasEngine | None:
        """No bucketed gradient engine to tune (default)."""
        return None


@dataclass
class BuildContext:
    """What a mode's builder gets besides its options (built by ``mpitrain.train.run``)."""

    cfg: TrainConfig
    world: World  #: the ranks that train (param-server: the workers only)
    module: torch.nn.Module
    device: torch.device
    steps_per_epoch: int = 1
    #: ``make_reducer(overlap)`` -> the run's gradient transport (Collective: a fresh
    #: ``comm.factory.make_reducer`` stack with its own communicators; overlap None: default)
    make_reducer: Callable[[bool | None], Reducer] | None = None
    link: Any = None  #: param-server only: the worker's ServerLink


@dataclass(frozen=True)
class ModeSpec:
    """One registered exchange mode (one row of :data:`MODES` points at it).

    Attributes:
        name: the ``--exchange`` value.
        options: ``options(cfg)`` -> the mode's option dataclass (validated there; raise
            ConfigError naming the option and a fix).
        build: ``build(ctx, opts)`` -> the :class:`Exchange` (Collective).
        lag: ``lag(opts)`` -> steps by which ranks may drift apart, so the per-step stop /
            checkpoint agreement may complete that many steps late (0 = blocking).
        fields: the ``TrainConfig`` fields that belong to this mode (setting one that only
            other modes own is refused).
        tuned: ``tuned(cfg, ranks)`` -> hyperparameters (``TrainConfig`` field -> value) that
            train well with this mode on ``ranks`` launched ranks, applied to the fields the
            user did not set (``--mode-defaults``, docs/async.md).
        launch: None, or the mode's own role split (Collective): ``launch(cfg, world,
            worker_main, make_optimizer, preempt) -> exit code`` runs ``worker_main(
            worker_comm, link)`` on the ranks that train (param-server: servers on the last
            ranks, each stepping ``make_optimizer(params)``).
    """

    name: str
    options: Callable[[TrainConfig], Any]
    build: Callable[[BuildContext, Any], Exchange]
    lag: Callable[[Any], int] = lambda _opts: 0
    fields: tuple[str, ...] = ()
    tuned: Callable[[TrainConfig, int], Mapping[str, Any]] = lambda _cfg, _ranks: {}
    launch: Callable[..., int] | None = None


#: mode name -> "module:ATTRIBUTE" of its ModeSpec (imported on first use: no MPI at import)
MODES: dict[str, str] = {
    "sync": "mpitrain.grad.parallel:SPEC",
    "double-buffer": "mpitrain.grad.modes.double_buffer:SPEC",
    "local-sgd": "mpitrain.grad.modes.local_sgd:SPEC",
    "param-server": "mpitrain.grad.modes.param_server_mode:SPEC",
}


def mode_names() -> list[str]:
    """Return the registered ``--exchange`` values."""
    return list(MODES)


def get_mode(name: str) -> ModeSpec:
    """Return the registered spec of mode ``name`` (ConfigError for an unknown one)."""
    where = MODES.get(name)
    if where is None:
        raise ConfigError(
            with_hint(f"exchange mode {name!r} is unknown", f"use one of {', '.join(MODES)}")
        )
    module, attr = where.split(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, ModeSpec) or spec.name != name:
        raise ConfigError(f"{where} is not the ModeSpec of {name!r}")
    return spec



def mode_options(cfg: TrainConfig) -> Any:
    """Return ``cfg.exchange``'s option dataclass, refusing options of other modes.

    Raises:
        ConfigError: an option of another mode was set explicitly (a nonsense combination),
            or the mode's own validation failed.
    """
    spec = get_mode(cfg.exchange)
    explicit = explicit_options(cfg)
    for other in MODES:
        if other == cfg.exchange:
            continue
        for name in get_mode(other).fields:
            if name in explicit and name not in spec.fields:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    with_hint(
                        f"option '{name}' belongs to --exchange {other}, "
                        f"but this run uses --exchange {cfg.exchange}",
                        f"drop {flag} (MPITRAIN_{name.upper()}, or the file key) "
                        f"or use --exchange {other}",
                    )
                )
    return spec.options(cfg)


#: tuned values that only make sense together: setting one member keeps the whole group
#: at the user's values and the plain defaults (an lr tuned for another batch is no tuning)
TUNED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("lr", "scale_lr", "batch_size", "global_batch", "accumulate"),
    ("momentum", "nesterov"),
)


def tuned_changes(cfg: TrainConfig, ranks: int) -> dict[str, Any]:
    """Return the mode's tuned hyperparameters the user did not set (empty when off).

    Args:
        cfg: the resolved config.
        ranks: ranks launched (param-server: servers included).
    """
    if not cfg.mode_defaults:
        return {}
    explicit = explicit_options(cfg)
    if cfg.optimizer != "sgd" or "optimizer" in explicit:
        return {}  # the tuned values are SGD's; a chosen optimizer keeps the user's settings
    tuned = get_mode(cfg.exchange).tuned(cfg, ranks)
    kept = {k for group in TUNED_GROUPS if explicit & set(group) for k in group}
    return {
        k: v for k, v in tuned.items()
        if k not in explicit and k not in kept and getattr(cfg, k) != v
    }


def build_exchange(ctx: BuildContext) -> Exchange:
    """Collective: build ``ctx.cfg.exchange``'s wrapper around ``ctx.module``."""
    spec = get_mode(ctx.cfg.exchange)
    return spec.build(ctx, mode_options(ctx.cfg))


def agreement_lag(cfg: TrainConfig) -> int:
    """Steps by which ``cfg.exchange`` lets ranks drift apart (the step agreement's lag)."""
    spec = get_mode(cfg.exchange)
    return spec.lag(spec.options(cfg))
