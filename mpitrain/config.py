"""Training configuration, resolved in one place: CLI > MPITRAIN_* env > TOML file > defaults.

What each option accepts is declared once, in its field's metadata (``accepted=Range(...)``,
``choices=``, ``check=``); :func:`coerce` and :func:`validate` both read it, so a value from a
flag, a variable, a file or code is held to the same rules.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from mpitrain.config_checks import check_combinations
from mpitrain.config_values import (
    OPTIMIZER_DEFAULTS,
    Range,
    available_stop_signals,
    check_model,
    check_nonempty,
    check_signals,
    convert,
    has_type,
    show,
)
from mpitrain.errors import ConfigError, with_hint

#: the sections of ``--help``, in the order a user thinks about a run; every option names one
DATA, MODEL, PARALLEL, OPTIM = "data", "model", "parallelism", "optimisation"
EXCHANGE, FAULTS = "exchange and sharding", "checkpoints and faults"
LOGGING = "logging and profiling"
SECTIONS = (DATA, MODEL, PARALLEL, OPTIM, EXCHANGE, FAULTS, LOGGING)


def _opt(
    section: str,
    default: Any,
    help: str,
    choices: Sequence[str] | None = None,
    *,
    accepted: Range | None = None,
    check: Callable[[Any, str], None] | None = None,
) -> Any:
    """Declare an option: its ``--help`` section, default, help text and what it accepts."""
    meta = {
        "help": help, "choices": choices, "accepted": accepted, "check": check,
        "internal": False, "section": section,
    }
    return field(default=default, metadata=meta)


def _internal(default: Any, help: str) -> Any:
    """Declare a field that is not an option (set by the trainer or by :func:`resolve`)."""
    meta = {"help": help, "choices": None, "accepted": None, "check": None, "internal": True,
            "section": None}
    return field(default=default, metadata=meta)


_MILLION, _TRILLION = 1_000_000, 1_000_000_000_000


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; field names are the option names.

    ``run_id`` is the one field that is not an option: the trainer sets it (see
    :func:`mpitrain.checkpoint.plan_run`) and carries it into its checkpoints.
    """

    # data and model
    data: str | None = _opt(
        DATA, None, "dataset directory made by data_tools (default: built-in digits)",
        check=check_nonempty("data"),
    )
    train_split: str = _opt(
        DATA, "train", "split of --data to train on", check=check_nonempty("train_split")
    )
    test_split: str = _opt(DATA, "test", "split of --data to evaluate on ('' to skip)")
    model: str = _opt(
        MODEL, "mlp", "mlp | cnn | gpt | llama | gpt2 | package.module:factory "
        "(factory(config) -> nn.Module, or a ParallelSpec for tensor/pipeline parallelism)",
        check=check_model,
    )
    compile: str = _opt(
        MODEL, "none", "torch.compile the model: regions (each child module alone, so gradient "
        "buckets still launch during backward), full (one graph: they launch after it), none",
        ("none", "regions", "full"),
    )
    hidden: int = _opt(
        MODEL, 128, "hidden width of the built-in models", accepted=Range(1, 1 << 20)
    )
    # model parallelism and the built-in GPT (docs/model-parallel.md)
    tensor_parallel: int = _opt(
        PARALLEL, 1, "ranks that split each layer (tensor parallelism; inside a node)",
        accepted=Range(1, 4096),
    )
    pipeline_stages: int = _opt(
        PARALLEL, 1, "ranks that split the layers into stages", accepted=Range(1, 4096)
    )
    micro_batches: int = _opt(
        PARALLEL, 1, "pipeline micro-batches per step (--batch-size divides by it)",
        accepted=Range(1, 65536),
    )
    pipeline_schedule: str = _opt(PARALLEL, "1f1b", "pipeline schedule",
                                  ("1f1b", "gpipe", "interleaved"))
    virtual_stages: int = _opt(
        PARALLEL, 1, "--pipeline-schedule interleaved: model chunks per pipeline rank",
        accepted=Range(1, 256),
    )
    sequence_parallel: bool = _opt(
        PARALLEL, False, "tensor parallel: split activations along the sequence"
    )
    activation_checkpointing: str = _opt(PARALLEL, "none", "recompute the blocks' activations "
        "in backward: full (keep each block's input), selective (also its attention and every "
        "other matmul output; docs/model-parallel.md)", ("none", "full", "selective"))
    context: int = _opt(MODEL, 128, "language models: tokens per sample",
                        accepted=Range(2, 1 << 16))
    layers: int = _opt(MODEL, 4, "language models: transformer blocks", accepted=Range(1, 4096))
    heads: int = _opt(MODEL, 4, "language models: attention heads (divisible by --tensor-parallel)",
                      accepted=Range(1, 4096))
    # schedule
    epochs: int = _opt(OPTIM, 12, "passes over the training split", accepted=Range(1, _MILLION))
    max_steps: int = _opt(
        OPTIM, 0, "stop after this many optimizer steps (0 = no limit)",
        accepted=Range(0, _TRILLION),
    )
    batch_size: int = _opt(OPTIM, 32, "samples per rank per step", accepted=Range(1, 1 << 20))
    global_batch: int = _opt(OPTIM, 0, "samples per step over all ranks, kept when the rank count "
                             "changes (0: batch-size x ranks x accumulate)",
                             accepted=Range(0, 1 << 30))
    lr: float = _opt(
        OPTIM, OPTIMIZER_DEFAULTS["sgd"].lr,
        "learning rate for a batch of --batch-size samples (see --scale-lr)",
        accepted=Range(0, 1000, lo_open=True),
    )
    scale_lr: bool = _opt(
        OPTIM, True, "scale lr with global batch / batch-size by the optimizer's rule "
        f"({', '.join(f'{k}: {v.scaling}' for k, v in OPTIMIZER_DEFAULTS.items())})",
    )
    optimizer: str = _opt(OPTIM, "sgd", "optimizer", tuple(OPTIMIZER_DEFAULTS))
    momentum: float = _opt(OPTIM, 0.9, "SGD momentum", accepted=Range(0, 1, hi_open=True))
    nesterov: bool = _opt(OPTIM, False, "SGD Nesterov momentum")
    weight_decay: float = _opt(OPTIM, 0.0, "weight decay", accepted=Range(0, 1))
    lr_schedule: str = _opt(
        OPTIM, "cosine", "lr decay after warm-up", ("constant", "cosine", "step")
    )
    warmup_epochs: float = _opt(
        OPTIM, 1.0, "linear lr warm-up length in epochs", accepted=Range(0, _MILLION)
    )
    step_every: int = _opt(
        OPTIM, 10, "epochs between x0.1 decays for --lr-schedule step", accepted=Range(1, _MILLION)
    )
    clip_grad_norm: float = _opt(
        OPTIM, 0.0, "clip gradients to this global norm (0 = off)", accepted=Range(0, 1e9)
    )
    precision: str = _opt(OPTIM, "fp32", "autocast precision", ("fp32", "bf16", "fp16"))
    seed: int = _opt(
        OPTIM, 0, "seed for model init, data order and dropout", accepted=Range(0, 2**32 - 1)
    )
    shuffle: str = _opt(DATA, "global", "data order within an epoch", ("global", "chunk", "none"))
    prefetch: int = _opt(
        DATA, 2, "batches read ahead by the loader thread", accepted=Range(1, 1024)
    )
    hdf5_driver: str = _opt(
        DATA, "posix", "open shards per rank (posix) or collectively with MPI-IO", ("posix", "mpio")
    )
    eval_every: int = _opt(
        LOGGING, 1, "evaluate every E epochs (0 = only at the end)", accepted=Range(0, _MILLION)
    )
    # gradient exchange
    bucket_mb: float | None = _opt(
        EXCHANGE, None, "gradient bucket size in MiB (default: measured, docs/engine.md), or "
        "'auto' (kept as 0): try 1, 4 and 16 MiB over the first steps, keep the fastest",
        accepted=Range(0, 4096, lo_open=True, off=0, off_label="auto"),
    )
    compression: str = _opt(
        EXCHANGE, "none", "gradient compression hook",
        ("none", "fp16", "bf16", "fp16-ef", "bf16-ef"),
    )
    accumulate: int = _opt(
        OPTIM, 1, "micro-batches accumulated per optimizer step", accepted=Range(1, 65536)
    )
    exchange: str = _opt(
        EXCHANGE, "sync", "gradient exchange mode",
        ("sync", "double-buffer", "local-sgd", "param-server"),
    )
    shard: str = _opt(
        EXCHANGE, "none", "ZeRO sharding across ranks: optimizer state, + gradients, + parameters "
        "(ZeRO-1/2/3, docs/sharding.md)", ("none", "optimizer", "gradients", "parameters"),
    )
    local_steps: int = _opt(
        EXCHANGE, 4, "local SGD: local steps between model averages", accepted=Range(1, _MILLION)
    )
    servers: int = _opt(
        EXCHANGE, 1, "param-server: ranks that hold parameters", accepted=Range(1, 65536)
    )
    max_staleness: int = _opt(
        EXCHANGE, 0, "param-server: max parameter versions a worker may lag",
        accepted=Range(0, _MILLION),
    )
    sync_warmup_steps: int | None = _opt(
        EXCHANGE, None, "local-sgd, param-server (tau > 0): synchronous steps first "
        "(default: the lr warm-up's)", accepted=Range(0, _TRILLION),
    )
    local_sgd_average_optimizer: bool = _opt(
        EXCHANGE, False, "local SGD: also average optimizer state"
    )
    double_buffer_progress: str = _opt(
        EXCHANGE, "poll", "double-buffer: who drives the in-flight all-reduce",
        ("poll", "thread", "none"),
    )
    delay_compensation: float = _opt(
        EXCHANGE, 0.0, "double-buffer: DC-ASGD lambda (0 = off)", accepted=Range(0, _MILLION)
    )
    mode_defaults: bool = _opt(
        OPTIM, True, "apply tuned defaults where unset: the exchange mode's lr/momentum, "
        "--model gpt's size and optimizer"
    )
    straggler_ms: float = _opt(
        EXCHANGE, 0.0, "test option: sleep this long on one rank every step",
        accepted=Range(0, 3_600_000),
    )
    straggler: str = _opt(
        EXCHANGE, "last",
        "test option: which rank sleeps: the last one, or a seeded random one per step",
        ("last", "random"),
    )
    # devices and transports
    device: str = _opt(PARALLEL, "auto", "compute device", ("auto", "cpu", "cuda"))
    allow_shared_gpu: bool = _opt(PARALLEL, False, "allow more ranks per node than GPUs")
    cuda_aware: str = _opt(EXCHANGE, "auto", "hand device buffers to MPI", ("auto", "yes", "no"))
    comm_progress: str = _opt(
        EXCHANGE, "auto", "what moves the gradient buckets' all-reduces during backward: "
        "thread (a communication thread runs them), poll (non-blocking calls, moved in the "
        "engine's waits), mpi (the MPI library's own progress thread: launch with "
        "MPIR_CVAR_ASYNC_PROGRESS=1), auto (measured per MPI library, docs/engine.md)",
        ("auto", "thread", "poll", "mpi"),
    )
    allreduce: str = _opt(
        EXCHANGE, "auto", "all-reduce algorithm (auto: hierarchical across hosts with several "
        "ranks each, docs/cluster.md)", ("flat", "hierarchical", "auto"),
    )
    # run directory, checkpoints, robustness
    run_dir: str | None = _opt(
        LOGGING, None, "directory for metrics.jsonl and the summary",
        check=check_nonempty("run_dir"),
    )
    summary_json: str | None = _opt(
        LOGGING, None, "rank 0 writes the final summary here as JSON",
        check=check_nonempty("summary_json"),
    )
    checkpoint_dir: str | None = _opt(
        FAULTS, None, "directory for the checkpoints of one run",
        check=check_nonempty("checkpoint_dir"),
    )
    checkpoint_every: int = _opt(
        FAULTS, 0, "checkpoint every N optimizer steps (0 = off)", accepted=Range(0, _TRILLION)
    )
    checkpoint_minutes: float = _opt(
        FAULTS, 0.0, "checkpoint every M minutes (0 = off)", accepted=Range(0, 525_600)
    )
    keep_last: int = _opt(FAULTS, 3, "checkpoints of this run kept", accepted=Range(1, _MILLION))
    resume: str | None = _opt(FAULTS, None, "'auto' (latest complete checkpoint, if any) or a path")
    preempt_signals: str = _opt(
        FAULTS, "USR1,TERM", "signals that stop the run with a checkpoint", check=check_signals
    )
    hang_timeout: float = _opt(
        FAULTS, 600.0, "abort when a step takes longer than this (seconds; 0 = off)",
        accepted=Range(1, 30 * 86400, off=0),
    )
    io_timeout: float = _opt(
        FAULTS, 1800.0, "abort when opening the data, loading or writing a checkpoint takes longer "
        "than this (seconds; 0 = off)",
        accepted=Range(1, 30 * 86400, off=0),
    )
    on_rank_loss: str = _opt(
        FAULTS, "abort", "when a rank dies: abort the job (requeue from a checkpoint), or shrink "
        "to the survivors and go on (Open MPI's mpirun --with-ft ulfm; docs/robustness.md)",
        ("abort", "shrink"),
    )
    min_ranks: int = _opt(FAULTS, 1, "--on-rank-loss shrink: below this many ranks, checkpoint "
                          "and exit 99 for a requeue", accepted=Range(1, _MILLION))
    progress: bool = _opt(LOGGING, True, "rank-0 progress bar (plain lines when not a TTY)")
    log_level: str = _opt(LOGGING, "info", "log level", ("debug", "info", "warning", "error"))
    tensorboard: str | None = _opt(
        LOGGING, None, "also write TensorBoard events to this directory",
        check=check_nonempty("tensorboard"),
    )
    timeline: str | None = _opt(
        LOGGING, None,
        "write a Chrome trace of the --timeline-steps to this file (docs/profiling.md)",
        check=check_nonempty("timeline"),
    )
    timeline_steps: str = _opt(
        LOGGING, "10:20", "steps A:B that --timeline records (from 0, B excluded)"
    )
    sample_log: str | None = _opt(
        LOGGING, None,
        "append each rank's trained sample indices to PATH.rankR (audit data coverage)",
        check=check_nonempty("sample_log"),
    )
    # not an option: set by the trainer
    run_id: str | None = _internal(None, "id of the run the checkpoints belong to")
    explicit: str = _internal("", "options the user set (comma-separated; by resolve)")

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with some fields changed (validated)."""
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dict (for checkpoints and summaries)."""
        return dataclasses.asdict(self)


_ALL = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: the options a user may set (flags, MPITRAIN_* variables, files)
_FIELDS = {name: f for name, f in _ALL.items() if not f.metadata["internal"]}
_TYPES: dict[str, Any] = get_type_hints(TrainConfig)


def valid_keys() -> list[str]:
    """Return the option names accepted in files and MPITRAIN_* variables."""
    return sorted(_FIELDS)


def _base_type(name: str) -> type:
    hint = _TYPES[name]
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    return args[0] if args else hint  # type: ignore[no-any-return]


def _optional(name: str) -> bool:
    return type(None) in getattr(_TYPES[name], "__args__", ())


def accepted(name: str) -> str:
    """Say in words what option ``name`` accepts (the HINT of its errors)."""
    f, typ = _ALL[name], _base_type(name)
    meta = f.metadata
    if meta["accepted"] is not None:
        text = meta["accepted"].describe(typ is int)
    elif meta["choices"]:
        text = f"one of {', '.join(meta['choices'])}"
    elif typ is bool:
        text = "true/false (in flags and variables also 1/0, yes/no, on/off)"
    elif name == "preempt_signals":
        text = f"a string: a comma-separated list of {', '.join(available_stop_signals())}"
    else:
        text = "a string"
    return f"{text} (or unset)" if _optional(name) and f.default is None else text


_KIND = {int: "integer", float: "number", bool: "true/false", str: "string"}


def _not_a(name: str, value: Any, source: str) -> ConfigError:
    """The error for a value that is not of the option's type at all."""
    return ConfigError(
        with_hint(
            f"option '{name}' from {source} has a bad value {show(value)} "
            f"(expected {_KIND[_base_type(name)]})",
            f"accepted: {accepted(name)}",
        )
    )


def _check_value(name: str, value: Any, source: str | None, shown: Any) -> None:
    """Raise a ConfigError unless ``value`` (already of the option's type) is accepted.

    ``source`` names where the value came from (a flag, a variable, a file), None for code.
    """
    if value is None and _optional(name):
        return
    meta = _ALL[name].metadata
    head = (
        f"option '{name}' from {source} has a bad value {show(shown)}"
        if source is not None
        else f"option '{name}' = {show(shown)} is out of range"
    )
    rng: Range | None = meta["accepted"]
    if rng is not None and not rng.contains(value):
        raise ConfigError(with_hint(head, f"accepted: {accepted(name)}"))
    choices = meta["choices"]
    if choices and value not in choices:
        raise ConfigError(with_hint(head, f"choose one of {', '.join(choices)}"))
    check = meta["check"]
    if check is not None:
        check(value, source or "the config")


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert a raw value (string from env/CLI or TOML value) to the option's type, checked.

    Raises:
        ConfigError: naming the option, the source, the value and what is accepted.
    """
    if value is None:
        return None
    typ = _base_type(name)
    if name == "bucket_mb" and isinstance(value, str) and value.strip().lower() == "auto":
        value = 0.0  # autotune (docs/profiling.md)
    try:
        typed = convert(typ, value)
    except (TypeError, ValueError, OverflowError):
        raise _not_a(name, value, source) from None
    _check_value(name, typed, source, value)
    return typed


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every option's type, range, choices and combinations; return ``cfg`` (or raise
    ConfigError)."""
    for name in _ALL:
        value = getattr(cfg, name)
        if not (_optional(name) if value is None else has_type(_base_type(name), value)):
            raise ConfigError(
                with_hint(
                    f"option '{name}' = {show(value)} has the wrong type",
                    f"accepted: {accepted(name)}",
                )
            )
        _check_value(name, value, None, value)
    check_combinations(cfg)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, in ``--help`` sections (:mod:`mpitrain.config_args`)."""
    from mpitrain.config_args import add_arguments as add
    add(parser)


def option_fields() -> dict[str, dataclasses.Field[Any]]:
    """Return the options a user may set, by name, in declaration order."""
    return dict(_FIELDS)


def option_type(name: str) -> type:
    """Return the type of option ``name`` (``int`` for ``int | None``)."""
    return _base_type(name)


def resolve(cli: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Merge defaults < file < env < CLI into a validated TrainConfig (``resolve_sources``
    also says where each value came from)."""
    from mpitrain.config_sources import resolve_sources

    return resolve_sources(cli, environ)[0]
