"""What :class:`~mpitrain.lightning.strategy.MPIStrategy` is asked to do, checked once.

A small frozen policy object: the strategy's keyword arguments land here, every value is
validated where it is built (one-line ConfigError naming the option and a fix), and the rest
of the package reads plain attributes. Importing this module loads neither torch nor
Lightning.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from mpitrain.errors import ConfigError, with_hint

#: ``shard=`` values -> ZeRO stage (0: replicas, mpitrain.DataParallel); as ``--shard``
SHARD_STAGES = {"none": 0, "optimizer": 1, "gradients": 2, "parameters": 3}
#: gradient compression per exchange: error feedback needs the full gradient on every rank
COMPRESSION = {
    "replicas": ("none", "fp16", "bf16", "fp16-ef", "bf16-ef"),
    "sharded": ("none", "fp16", "bf16"),
}
ALLREDUCE = ("auto", "flat", "hierarchical")
CUDA_AWARE = ("auto", "yes", "no")


@dataclass(frozen=True)
class MPIOptions:
    """The strategy's mpitrain options (see :class:`MPIStrategy` for each one's meaning)."""

    shard: str = "none"
    bucket_mb: float | None = None
    compression: str = "none"
    allreduce: str = "auto"
    cuda_aware: str = "auto"
    preempt_signals: str = "USR1,TERM"
    hang_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.shard not in SHARD_STAGES:
            raise ConfigError(with_hint(
                f"MPIStrategy(shard={self.shard!r}) is not a sharding mode",
                f"use one of {', '.join(repr(s) for s in SHARD_STAGES)}"))
        kind = "sharded" if self.stage else "replicas"
        if self.compression not in COMPRESSION[kind]:
            extra = (" (error feedback keeps the residual of the full gradient, which a "
                     "sharded rank does not hold)" if self.stage else "")
            raise ConfigError(with_hint(
                f"MPIStrategy(compression={self.compression!r}) is not available with "
                f"shard={self.shard!r}{extra}",
                f"use one of {', '.join(COMPRESSION[kind])}"))
        if self.allreduce not in ALLREDUCE:
            raise ConfigError(with_hint(
                f"MPIStrategy(allreduce={self.allreduce!r}) is unknown",
                f"use one of {', '.join(ALLREDUCE)}"))
        if self.cuda_aware not in CUDA_AWARE:
            raise ConfigError(with_hint(
                f"MPIStrategy(cuda_aware={self.cuda_aware!r}) is unknown",
                f"use one of {', '.join(CUDA_AWARE)}"))
        if self.bucket_mb is not None and not (
                isinstance(self.bucket_mb, int | float) and not isinstance(self.bucket_mb, bool)
                and 0 < float(self.bucket_mb) < float("inf")):
            raise ConfigError(with_hint(
                f"MPIStrategy(bucket_mb={self.bucket_mb!r}) is not a positive number of MiB",
                "pass e.g. bucket_mb=25, or None for the engine's default"))
        if self.hang_timeout is not None and not (
                isinstance(self.hang_timeout, int | float)
                and not isinstance(self.hang_timeout, bool)
                and 0 < float(self.hang_timeout) < float("inf")):
            raise ConfigError(with_hint(
                f"MPIStrategy(hang_timeout={self.hang_timeout!r}) is not a positive number "
                "of seconds", "pass e.g. hang_timeout=300, or None for no watchdog"))
        self.signals()  # parse now: a bad name fails at construction, not at the first step

    @property
    def stage(self) -> int:
        """The ZeRO stage (0: replicas through ``mpitrain.DataParallel``)."""
        return SHARD_STAGES[self.shard]

    def signals(self) -> list[signal.Signals]:
        """The preemption signals (``""``: none), parsed as ``--preempt-signals`` is."""
        from mpitrain.config_values import parse_signals

        return parse_signals(self.preempt_signals, "MPIStrategy(preempt_signals=...)")
