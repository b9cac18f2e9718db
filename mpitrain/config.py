"""Training configuration, resolved in one place: CLI > MPITRAIN_* env > TOML file > defaults."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime import env


def _opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; field names are the option names."""

    # data and model
    data: str | None = _opt(None, "dataset directory made by data_tools (default: built-in digits)")
    train_split: str = _opt("train", "split of --data to train on")
    test_split: str = _opt("test", "split of --data to evaluate on ('' to skip)")
    model: str = _opt("mlp", "mlp | cnn | package.module:factory (factory(config) -> nn.Module)")
    hidden: int = _opt(128, "hidden width of the built-in models")
    # schedule
    epochs: int = _opt(12, "passes over the training split")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = no limit)")
    batch_size: int = _opt(32, "samples per rank per step")
    lr: float = _opt(0.05, "learning rate (for the whole job, see --scale-lr)")
    scale_lr: bool = _opt(True, "multiply lr by ranks x accumulate (linear scaling rule)")
    optimizer: str = _opt("sgd", "optimizer", ("sgd", "adam", "adamw"))
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    lr_schedule: str = _opt("cosine", "lr decay after warm-up", ("constant", "cosine", "step"))
    warmup_epochs: float = _opt(1.0, "linear lr warm-up length in epochs")
    step_every: int = _opt(10, "epochs between x0.1 decays for --lr-schedule step")
    clip_grad_norm: float = _opt(0.0, "clip gradients to this global norm (0 = off)")
    precision: str = _opt("fp32", "autocast precision", ("fp32", "bf16", "fp16"))
    seed: int = _opt(0, "seed for model init, data order and dropout")
    shuffle: str = _opt("global", "data order within an epoch", ("global", "chunk", "none"))
    prefetch: int = _opt(2, "batches read ahead by the loader thread")
    hdf5_driver: str = _opt(
        "posix", "open shards per rank (posix) or collectively with MPI-IO", ("posix", "mpio")
    )
    eval_every: int = _opt(1, "evaluate every E epochs (0 = only at the end)")
    # gradient exchange
    bucket_mb: float | None = _opt(
        None, "gradient bucket size in MiB (default: measured, docs/engine.md)"
    )
    compression: str = _opt(
        "none", "gradient compression hook (none, fp16, bf16, fp16-ef, bf16-ef)"
    )
    accumulate: int = _opt(1, "micro-batches accumulated per optimizer step")
    exchange: str = _opt(
        "sync", "gradient exchange mode", ("sync", "double-buffer", "local-sgd", "param-server")
    )
    local_steps: int = _opt(4, "local SGD: local steps between model averages")
    servers: int = _opt(1, "param-server: ranks that hold parameters")
    max_staleness: int = _opt(0, "param-server: max parameter versions a worker may lag")
    straggler_ms: float = _opt(0.0, "test option: sleep this long on one rank every step")
    straggler: str = _opt(
        "last", "test option: which rank sleeps: the last one, or a seeded random one per step",
        ("last", "random"),
    )
    # devices and transports
    device: str = _opt("auto", "compute device", ("auto", "cpu", "cuda"))
    allow_shared_gpu: bool = _opt(False, "allow more ranks per node than GPUs")
    cuda_aware: str = _opt("auto", "hand device buffers to MPI", ("auto", "yes", "no"))
    allreduce: str = _opt("flat", "all-reduce algorithm", ("flat", "hierarchical", "auto"))
    # run directory, checkpoints, robustness
    run_dir: str | None = _opt(None, "directory for metrics.jsonl and the summary")
    summary_json: str | None = _opt(None, "rank 0 writes the final summary here as JSON")
    checkpoint_dir: str | None = _opt(None, "directory for checkpoints")
    checkpoint_every: int = _opt(0, "checkpoint every N optimizer steps (0 = off)")
    checkpoint_minutes: float = _opt(0.0, "checkpoint every M minutes (0 = off)")
    keep_last: int = _opt(3, "checkpoints kept")
    resume: str | None = _opt(None, "'auto' (latest complete checkpoint, if any) or a path")
    preempt_signals: str = _opt("USR1,TERM", "signals that stop the run with a checkpoint")
    hang_timeout: float = _opt(600.0, "abort when a step takes longer than this (seconds)")
    progress: bool = _opt(True, "rank-0 progress bar (plain lines when not a TTY)")
    log_level: str = _opt("info", "log level", ("debug", "info", "warning", "error"))
    tensorboard: str | None = _opt(None, "also write TensorBoard events to this directory")

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with some fields changed (validated)."""
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dict (for checkpoints and summaries)."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES: dict[str, Any] = get_type_hints(TrainConfig)
_POSITIVE = (
    "epochs",
    "batch_size",
    "accumulate",
    "local_steps",
    "servers",
    "keep_last",
    "prefetch",
)
_NON_NEGATIVE = (
    "max_steps",
    "checkpoint_every",
    "checkpoint_minutes",
    "eval_every",
    "max_staleness",
    "straggler_ms",
    "warmup_epochs",
    "weight_decay",
    "clip_grad_norm",
    "momentum",
)


def valid_keys() -> list[str]:
    """Return the option names accepted in files and MPITRAIN_* variables."""
    return sorted(_FIELDS)


def _base_type(name: str) -> type:
    hint = _TYPES[name]
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    return args[0] if args else hint  # type: ignore[no-any-return]


def _unknown(key: str, source: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(
        with_hint(
            f"unknown option '{key}' in {source}", f"{hint}valid keys: {', '.join(valid_keys())}"
        )
    )


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert a raw value (string from env/CLI or TOML value) to the option's type."""
    typ = _base_type(name)
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(
            with_hint(
                f"option '{name}' from {source} has a bad value {value!r}",
                f"expected {typ.__name__}",
            )
        ) from None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ranges and choices; return ``cfg`` unchanged or raise ConfigError."""
    for name, f in _FIELDS.items():
        value = getattr(cfg, name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                with_hint(
                    f"option '{name}' = {value!r} is not valid",
                    f"choose one of {', '.join(choices)}",
                )
            )
        if name in _POSITIVE and value < 1:
            raise ConfigError(
                with_hint(f"option '{name}' = {value} must be >= 1", "give a positive integer")
            )
        if name in _NON_NEGATIVE and value < 0:
            raise ConfigError(
                with_hint(f"option '{name}' = {value} must be >= 0", "give a value >= 0")
            )
    if cfg.lr <= 0:
        raise ConfigError(with_hint(f"option 'lr' = {cfg.lr} must be > 0", "e.g. --lr 0.05"))
    if cfg.bucket_mb is not None and cfg.bucket_mb <= 0:
        raise ConfigError(with_hint(f"option 'bucket_mb' = {cfg.bucket_mb} must be > 0", "e.g. 4"))
    if cfg.resume is not None and cfg.resume != "auto" and not cfg.resume:
        raise ConfigError(with_hint("option 'resume' is empty", "use 'auto' or a checkpoint path"))
    if cfg.precision == "fp16" and cfg.exchange in ("local-sgd", "param-server"):
        # the loss scaler's skip-on-overflow is agreed through the averaged gradients; these
        # modes step on each rank's own gradients, so ranks would skip steps independently
        raise ConfigError(
            with_hint(
                f"--precision fp16 is not supported with --exchange {cfg.exchange}",
                "use --precision bf16 (no loss scaling needed) or --exchange sync",
            )
        )
    if cfg.resume == "auto" and cfg.checkpoint_dir is None:
        raise ConfigError(
            with_hint("--resume auto needs --checkpoint-dir", "pass --checkpoint-dir DIR")
        )
    return cfg


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (top-level keys, or a [train] table); keys may use - or _."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(with_hint(f"config file '{p}' not found", "check --config")) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            with_hint(f"config file '{p}' is not valid TOML: {exc}", "fix the syntax")
        ) from None
    if isinstance(data.get("train"), dict) and len(data) == 1:
        data = data["train"]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise _unknown(key, f"config file '{p}'")
        out[name] = coerce(name, value, f"config file '{p}'")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; unset flags stay absent so lower layers can fill them."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of options", default=argparse.SUPPRESS
    )
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        typ = _base_type(name)
        default = f.default
        helptext = f"{f.metadata['help']} (default: {default})"
        if typ is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=helptext,
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                choices=f.metadata.get("choices"),
                help=helptext,
                type=str,
            )


def resolve(cli: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Merge defaults < file < env < CLI into a validated TrainConfig.

    Args:
        cli: options given on the command line (argparse namespace as a dict, unset ones absent);
            may hold ``config`` (a TOML path).
        environ: environment to read MPITRAIN_* options from (default: the process's).
    """
    values: dict[str, Any] = {}
    cli = dict(cli)
    file_path = cli.pop("config", None) or env.config_vars(environ).pop("config", None)
    if file_path:
        values.update(load_file(file_path))
    for key, raw in env.config_vars(environ).items():
        if key == "config":
            continue
        if key not in _FIELDS:
            raise _unknown(f"MPITRAIN_{key.upper()}", "the environment")
        values[key] = coerce(key, raw, f"MPITRAIN_{key.upper()}")
    for key, raw in cli.items():
        if key not in _FIELDS:
            raise _unknown(key, "the command line")
        values[key] = coerce(key, raw, f"--{key.replace('_', '-')}")
    return validate(TrainConfig(**values))
