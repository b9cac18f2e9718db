"""Exception hierarchy: every error mpitrain raises on purpose is an MpitrainError."""

from __future__ import annotations


class MpitrainError(Exception):
    """Base class of mpitrain's own errors; `str(e)` is a complete one-line message."""

    exit_code = 1


class ConfigError(MpitrainError):
    """A bad option, config key or value (exit code 2, like argparse)."""

    exit_code = 2


class DataError(MpitrainError):
    """A dataset, manifest or shard that cannot be used as given."""


class CheckpointError(MpitrainError):
    """A checkpoint that cannot be written, found or trusted."""


class CommError(MpitrainError):
    """Ranks disagree (model layout, world size) or a collective cannot proceed."""


class DeviceError(MpitrainError):
    """A device request the machine cannot satisfy."""


def with_hint(message: str, hint: str) -> str:
    """Join a message and a hint in the project's one-line style."""
    return f"{message}. HINT: {hint}"
