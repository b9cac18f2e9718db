"""Checks of option combinations, run by :func:`mpitrain.config.validate` after each field's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig


def check_combinations(cfg: TrainConfig) -> None:
    """Raise ConfigError for options that are fine alone but not together."""
    if cfg.resume is not None and cfg.resume != "auto" and not cfg.resume.strip():
        raise ConfigError(with_hint("option 'resume' is empty", "use 'auto' or a checkpoint path"))
    if cfg.compile != "none" and (cfg.shard == "parameters" or cfg.model in LANGUAGE_MODELS):
        raise ConfigError(with_hint(
            f"--compile {cfg.compile} is not available with "
            + ("--shard parameters (ZeRO-3 frees and re-gathers the parameters' storage "
               "around each unit, under the compiled graphs)" if cfg.shard == "parameters"
               else f"--model {cfg.model} (the grid's stages are not compiled yet)"),
            "drop --compile, or use --shard none|optimizer|gradients with your own model"))
    if cfg.compile != "none" and cfg.activation_checkpointing != "none":
        raise ConfigError(with_hint(
            f"--compile {cfg.compile} with --activation-checkpointing "
            f"{cfg.activation_checkpointing}: torch.compile decides what to recompute itself "
            "(its partitioner), and the checkpointed blocks would break its graphs",
            "drop one of them"))
    if cfg.bucket_mb == 0 and (cfg.exchange != "sync" or cfg.shard != "none"):
        raise ConfigError(with_hint("--bucket-mb auto tunes DataParallel's buckets only",
                                    "use it with --exchange sync and --shard none"))
    if cfg.precision == "fp16" and cfg.exchange in ("local-sgd", "param-server"):
        # the loss scaler's skip-on-overflow is agreed through the averaged gradients; these
        # modes step on each rank's own gradients, so ranks would skip steps independently
        raise ConfigError(
            with_hint(
                f"--precision fp16 is not supported with --exchange {cfg.exchange}",
                "use --precision bf16 (no loss scaling needed) or --exchange sync",
            )
        )
    check_rank_loss(cfg)
    if cfg.nesterov and cfg.optimizer == "sgd" and cfg.momentum == 0:
        raise ConfigError(
            with_hint("--nesterov needs --momentum > 0", "give --momentum 0.9 or --no-nesterov")
        )
    if cfg.resume == "auto" and cfg.checkpoint_dir is None:
        raise ConfigError(
            with_hint("--resume auto needs --checkpoint-dir", "pass --checkpoint-dir DIR")
        )
    if cfg.checkpoint_dir is None and (cfg.checkpoint_every or cfg.checkpoint_minutes):
        which = "checkpoint_every" if cfg.checkpoint_every else "checkpoint_minutes"
        value = getattr(cfg, which)
        raise ConfigError(
            with_hint(
                f"option '{which}' = {value!r} asks for checkpoints, but no --checkpoint-dir "
                "is given: none would be written",
                "pass --checkpoint-dir DIR",
            )
        )
    check_model_parallel(cfg)
    check_effects(cfg)


#: the byte-level GPT's vocabulary (docs/model-parallel.md)
GPT_VOCAB = 256
#: what --model gpt uses for the options the user did not set (applied by the train command,
#: mpitrain.train.gpt.gpt_defaults; checked here as they will be): a model that learns the
#: corpus in about a minute per rank-core, with AdamW
GPT_DEFAULTS: dict[str, Any] = {
    "context": 64, "hidden": 64, "layers": 4, "heads": 4, "epochs": 1, "batch_size": 32,
    "optimizer": "adamw", "lr": 3e-3, "scale_lr": False, "warmup_epochs": 0.05,
    "weight_decay": 0.01,
}


#: the built-in language models: they train on a tensor x pipeline x data grid
#: (mpitrain.train.models.MODELS; a user's factory may return a spec too)
LANGUAGE_MODELS = frozenset({"gpt", "llama", "gpt2"})

#: options only the language models read (refused with --model mlp / cnn)
GPT_ONLY = frozenset({"context", "layers", "heads", "pipeline_schedule", "virtual_stages"})


def explicit_options(cfg: TrainConfig) -> set[str]:
    """Return the options the user set (flags, ``MPITRAIN_*`` variables, the TOML file)."""
    return {name for name in cfg.explicit.split(",") if name}


def _effective(cfg: TrainConfig, name: str) -> Any:
    """``cfg``'s value of ``name`` once the GPT defaults apply (they do where unset)."""
    if cfg.mode_defaults and name in GPT_DEFAULTS and name not in explicit_options(cfg):
        return GPT_DEFAULTS[name]
    return getattr(cfg, name)


def _refuse(what: str, hint: str) -> None:
    raise ConfigError(with_hint(what, hint))


#: exchange modes a grid's data-parallel replicas cannot take, and why
GRID_REFUSED_MODES = {
    "double-buffer": "it applies the previous step's gradients while the next step computes, "
                     "but a pipeline step's gradients are complete only after its schedule "
                     "drains, so there is no next step's compute to hide them behind",
    "param-server": "its servers are ranks outside the grid that hold the whole model's "
                    "parameters; a stage's slice has no server",
}


def check_model_parallel(cfg: TrainConfig) -> None:
    """Refuse model-parallel options that do not fit the built-in GPT or each other."""
    tp, pp = cfg.tensor_parallel, cfg.pipeline_stages
    if cfg.model not in LANGUAGE_MODELS:
        if cfg.model in ("mlp", "cnn") and (
                tp > 1 or pp > 1 or cfg.micro_batches > 1 or cfg.sequence_parallel):
            _refuse("--tensor-parallel, --pipeline-stages, --micro-batches and "
                    "--sequence-parallel split a language model (gpt, llama, gpt2 or your "
                    "spec)", "add --model gpt (or drop those options)")
        if cfg.sequence_parallel and tp == 1:
            _refuse("--sequence-parallel needs --tensor-parallel > 1",
                    "add --tensor-parallel 2, or drop --sequence-parallel")
        if cfg.model in ("mlp", "cnn") and cfg.activation_checkpointing != "none":
            _refuse(f"--activation-checkpointing {cfg.activation_checkpointing}: --model "
                    f"{cfg.model} has no blocks to checkpoint (recomputing the whole small "
                    "network would keep as much)", "drop it, or use --model gpt, or your own "
                    "--model package.module:factory whose module declares "
                    "activation_checkpoint_units()")
        # the built-in mlp and cnn have no layers, heads, context or schedule: an option
        # that would change nothing is refused (a factory of yours may read them)
        unused = sorted(GPT_ONLY & explicit_options(cfg)) if cfg.model in ("mlp", "cnn") else []
        if unused:
            flags = ", ".join("--" + n.replace("_", "-") for n in unused)
            _refuse(f"{flags} shape the built-in GPT; --model {cfg.model} does not use "
                    f"{'it' if len(unused) == 1 else 'them'}",
                    "drop them, or use --model gpt or your own --model package.module:factory")
        check_virtual_stages(cfg, None)
        return
    # the replicas of a grid take sync or local SGD (docs/model-parallel.md says why)
    why = GRID_REFUSED_MODES.get(cfg.exchange)
    if why is not None:
        _refuse(f"--exchange {cfg.exchange} does not compose with --model {cfg.model}'s "
                f"tensor x pipeline x data grid: {why}",
                f"use --exchange sync or local-sgd (local SGD over the replicas) with "
                f"--model {cfg.model}")
    hidden, heads, layers, context, batch = (
        _effective(cfg, n) for n in ("hidden", "heads", "layers", "context", "batch_size"))
    if hidden % heads:
        _refuse(f"--hidden {hidden} does not divide into --heads {heads}",
                "pick a width that is a multiple of the head count")
    # --data's vocabulary is checked where its manifest is read (train.corpus.model_vocab)
    if heads % tp or (GPT_VOCAB % tp and not cfg.data):
        _refuse(f"--tensor-parallel {tp} must divide --heads {heads} and the "
                f"{GPT_VOCAB}-byte vocabulary", "use 1, 2 or 4 (a power of two dividing --heads)")
    if layers < pp:
        _refuse(f"--pipeline-stages {pp} is more than the {layers} layers",
                "give --layers at least the stage count")
    if batch % cfg.micro_batches:
        _refuse(f"--batch-size {batch} does not divide into --micro-batches "
                f"{cfg.micro_batches}", "make the batch a multiple of the micro-batch count")
    check_virtual_stages(cfg, layers)
    if cfg.sequence_parallel and (tp == 1 or context % tp):
        _refuse(f"--sequence-parallel needs --tensor-parallel > 1 dividing --context "
                f"{context}", "drop --sequence-parallel or change --context")


def check_virtual_stages(cfg: TrainConfig, layers: int | None) -> None:
    """Refuse virtual stages the interleaved schedule cannot run (``layers``: the built-in
    language model's blocks, each chunk needs one; None: a factory's model decides)."""
    v, pp, micro = cfg.virtual_stages, cfg.pipeline_stages, cfg.micro_batches
    if cfg.pipeline_schedule != "interleaved":
        if v > 1:
            _refuse(f"--virtual-stages {v} needs --pipeline-schedule interleaved (the "
                    f"{cfg.pipeline_schedule} schedule runs one chunk per rank)",
                    "add --pipeline-schedule interleaved, or drop --virtual-stages")
        return
    if pp == 1:
        _refuse("--pipeline-schedule interleaved needs --pipeline-stages > 1 (it interleaves "
                "the chunks of several pipeline ranks)", "add --pipeline-stages P")
    if v == 1:
        _refuse("--pipeline-schedule interleaved with --virtual-stages 1 is 1f1b",
                "add --virtual-stages 2 (or more), or use --pipeline-schedule 1f1b")
    if micro % pp:
        _refuse(f"--pipeline-schedule interleaved needs --micro-batches ({micro}) to be a "
                f"multiple of --pipeline-stages ({pp})",
                f"use --micro-batches {micro + pp - micro % pp}")
    if layers is not None and layers < v * pp:
        _refuse(f"--virtual-stages {v} x --pipeline-stages {pp} makes {v * pp} chunks, more "
                f"than the {layers} layers", f"give --layers at least {v * pp}, or fewer "
                "--virtual-stages")


@dataclass(frozen=True)
class Effect:
    """Where option ``name`` has an effect; set (flag, variable or file) elsewhere it is refused.

    Attributes:
        name: the option.
        applies: ``applies(cfg)`` -> whether the option does something on ``cfg``'s path.
        why: ``why(cfg)`` -> where it does nothing and why ("without --checkpoint-dir (...)").
        hint: the fix.
    """

    name: str
    applies: Callable[[TrainConfig], bool]
    why: Callable[[TrainConfig], str]
    hint: str


def _optimizer(cfg: TrainConfig) -> str:
    """The optimizer the run steps, and where it comes from when the user did not pick it."""
    if (cfg.model in LANGUAGE_MODELS and cfg.mode_defaults
            and "optimizer" not in explicit_options(cfg)):
        return f"{GPT_DEFAULTS['optimizer']} (--model {cfg.model}'s default)"
    return str(cfg.optimizer)


#: options that act only under another option or on some paths: set where they would change
#: nothing they are refused, never silently ignored (issue 22; every option x path is held to
#: it by tests/mpi/test_option_paths.py). Exchange modes' own options: ``grad.protocol``.
EFFECTS: tuple[Effect, ...] = (
    Effect("keep_last", lambda c: c.checkpoint_dir is not None,
           lambda c: "without --checkpoint-dir (it prunes the checkpoints written there)",
           "pass --checkpoint-dir DIR, or drop --keep-last"),
    Effect("timeline_steps", lambda c: c.timeline is not None,
           lambda c: "without --timeline (it picks the steps the timeline records)",
           "pass --timeline PATH, or drop --timeline-steps"),
    Effect("straggler", lambda c: c.straggler_ms > 0,
           lambda c: "without --straggler-ms (it picks the rank that --straggler-ms slows)",
           "pass --straggler-ms MS too, or drop --straggler"),
    Effect("step_every", lambda c: c.lr_schedule == "step",
           lambda c: f"with --lr-schedule {c.lr_schedule} (it spaces --lr-schedule step's decays)",
           "add --lr-schedule step, or drop --step-every"),
    Effect("eval_every", lambda c: c.test_split != "",
           lambda c: "with --test-split '' (nothing is evaluated)",
           "give a --test-split to evaluate on, or drop --eval-every"),
    *(Effect(name, lambda c: _optimizer(c) == "sgd",
             lambda c: f"with --optimizer {_optimizer(c)}: momentum is SGD's",
             "add --optimizer sgd, or drop --momentum and --nesterov")
      for name in ("momentum", "nesterov")),
    Effect("bucket_mb", lambda c: c.exchange == "sync",
           lambda c: f"with --exchange {c.exchange} (it sizes the buckets of the sync exchange "
                     "and of ZeRO; this mode sends one flat buffer)",
           "drop --bucket-mb, or use --exchange sync"),
    Effect("allreduce", lambda c: c.exchange != "param-server",
           lambda c: "with --exchange param-server (workers and servers exchange shards "
                     "point-to-point: nothing is all-reduced)",
           "drop --allreduce, or use --exchange sync, double-buffer or local-sgd"),
    Effect("comm_progress", lambda c: c.exchange != "param-server",
           lambda c: "with --exchange param-server (nothing is all-reduced during backward)",
           "drop --comm-progress, or use --exchange sync, double-buffer or local-sgd"),
    Effect("sync_warmup_steps", lambda c: c.exchange != "param-server" or c.max_staleness > 0,
           lambda c: "with --exchange param-server --max-staleness 0 (every step is "
                     "synchronous already)",
           "raise --max-staleness, or drop --sync-warmup-steps"),
    *(Effect(name, lambda c: c.device != "cpu",
             lambda c: "with --device cpu (it is about CUDA devices)",
             f"drop --{name.replace('_', '-')}, or use --device cuda or auto")
      for name in ("cuda_aware", "allow_shared_gpu")),
    Effect("cuda_aware", lambda c: c.exchange != "param-server",
           lambda c: "with --exchange param-server (it stages device buffers through the host)",
           "drop --cuda-aware, or use --exchange sync, double-buffer or local-sgd"),
)


def check_effects(cfg: TrainConfig) -> None:
    """Refuse an option set where it has no effect (:data:`EFFECTS`), naming it and the fix."""
    explicit = explicit_options(cfg)
    for rule in EFFECTS:
        if rule.name in explicit and not rule.applies(cfg):
            _refuse(f"--{rule.name.replace('_', '-')} has no effect {rule.why(cfg)}", rule.hint)


def check_device_options(cfg: TrainConfig, device_type: str) -> None:
    """Refuse options about CUDA devices on a run that got none (``--device auto`` on a
    machine without CUDA); ``device_type`` is the bound device's (``torch.device.type``)."""
    if device_type == "cuda":
        return
    unused = [n for n in ("cuda_aware", "allow_shared_gpu") if n in explicit_options(cfg)]
    if unused:
        flags = " and ".join("--" + n.replace("_", "-") for n in unused)
        _refuse(f"{flags} {'have' if len(unused) > 1 else 'has'} no effect: this run has no "
                f"CUDA device (--device {cfg.device} gave {device_type})",
                "drop them, or run where CUDA is available")


def check_rank_loss(cfg: TrainConfig) -> None:
    """``--on-rank-loss shrink``: what it can continue from (docs/robustness.md)."""
    if cfg.on_rank_loss != "shrink":
        if cfg.min_ranks != 1:
            raise ConfigError(with_hint("--min-ranks applies to --on-rank-loss shrink",
                                        "add --on-rank-loss shrink, or drop --min-ranks"))
        return
    split = cfg.shard != "none" or cfg.tensor_parallel * cfg.pipeline_stages > 1
    if (split or cfg.exchange != "sync") and not cfg.checkpoint_dir:
        what = (f"--exchange {cfg.exchange} (replicas that differ between agreements, or a "
                "server's parameters)" if cfg.exchange != "sync" else
                "state split across ranks (--shard, --tensor-parallel, --pipeline-stages)")
        raise ConfigError(with_hint(
            f"--on-rank-loss shrink with {what} needs --checkpoint-dir: what a lost rank held "
            "is reloaded from the newest checkpoint", "add --checkpoint-dir DIR "
            "--checkpoint-every N"))
