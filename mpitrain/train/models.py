"""The model registry: built-in models and the loader for user model factories.

``--model`` names a spec: a classifier (``mlp``, ``cnn``, a user's ``nn.Module``) trains data
parallel; a language model (``gpt``, ``llama``, ``gpt2``, a user's
:class:`~mpitrain.parallel.spec.ParallelSpec`) trains on a tensor x pipeline x data grid.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpitrain.errors import ConfigError, with_hint
from mpitrain.parallel.spec import ParallelSpec, SpecStage, StageBuilder
from mpitrain.train.gpt import GPTConfig, GPTStage

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.parallel.grid import Grid
    from mpitrain.runtime.world import World


class MLP(nn.Module):
    """A two-hidden-layer perceptron over flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """A small conv net for square single-channel images (e.g. 8x8 digits, 28x28 MNIST)."""

    def __init__(self, side: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * 16, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.features(x))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ClassifierSpec:
    """A model for the data-parallel path: ``build(feature_shape, num_classes)``."""

    name: str
    build: Callable[[Sequence[int], int], nn.Module]
    #: a user's module built ahead (``resolve_seeded``): the generator's state right after
    rng_after: torch.Tensor | None = None


@dataclass(frozen=True)
class GPTSpec:
    """The built-in GPT as a spec: its stages are :class:`~mpitrain.train.gpt.GPTStage`."""

    config: GPTConfig
    name: str = "gpt"

    @property
    def meta(self) -> dict[str, Any]:
        """The model's shape, saved with its checkpoints and compared on resume."""
        c = self.config
        return {"model": "gpt", "vocab": c.vocab, "context": c.context, "hidden": c.dim,
                "heads": c.heads, "layers": c.layers}

    def check(self, tensor: int, stages: int) -> None:
        """Nothing beyond the option checks (``mpitrain.config_checks``)."""

    def build_stage(self, tp: MPI.Intracomm, stage: int, stages: int,
                    device: torch.device) -> nn.Module:
        """This rank's stage (every block from its own seeded generator)."""
        return GPTStage(self.config, tp, stage, stages).to(device)

    def describe(self) -> str:
        """One line: the model and its shape."""
        c = self.config
        return f"gpt {c.layers} layers x {c.dim} wide, {c.heads} heads, context {c.context}"


def _cnn(cfg: TrainConfig) -> ClassifierSpec:
    def build(shape: Sequence[int], classes: int) -> nn.Module:
        in_features = math.prod(shape)
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ConfigError(with_hint(
                f"model 'cnn' needs square single-channel inputs, got shape {tuple(shape)}",
                "use --model mlp or your own --model package.module:factory"))
        return SmallCNN(side, classes)

    return ClassifierSpec("cnn", build)


def _hf(name: str) -> Callable[[TrainConfig], Any]:
    def make(cfg: TrainConfig) -> Any:
        from mpitrain.train import hf
        from mpitrain.train.corpus import model_vocab

        make_spec = hf.llama_spec if name == "llama" else hf.gpt2_spec
        return make_spec(cfg, model_vocab(cfg))  # the --data manifest's, or 256 bytes

    return make


#: ``--model`` names -> the spec for a config: classifiers (data parallel) and language models
#: (a tensor x pipeline x data grid: mpitrain.config_checks.LANGUAGE_MODELS)
MODELS: dict[str, Callable[[TrainConfig], Any]] = {
    "mlp": lambda cfg: ClassifierSpec(
        "mlp", lambda shape, n: MLP(math.prod(shape), n, cfg.hidden)),
    "cnn": _cnn,
    "gpt": lambda cfg: GPTSpec(GPTConfig.from_train(cfg)),
    "llama": _hf("llama"),
    "gpt2": _hf("gpt2"),
}


def resolve_model(cfg: TrainConfig) -> ClassifierSpec | StageBuilder:
    """The spec ``cfg.model`` names: a registry entry, or what a user's
    ``package.module:factory`` returns (an ``nn.Module``, or a :class:`ParallelSpec` for
    tensor and pipeline parallelism)."""
    if cfg.model in MODELS:
        spec: ClassifierSpec | StageBuilder = MODELS[cfg.model](cfg)
        return spec
    if ":" not in cfg.model:
        known = ", ".join(MODELS)
        raise ConfigError(with_hint(f"unknown model '{cfg.model}'",
                                    f"use one of {known}, or package.module:factory"))
    made = _load_factory(cfg.model)(cfg)
    if isinstance(made, nn.Module):
        return ClassifierSpec(cfg.model, lambda shape, n: made)
    if isinstance(made, ParallelSpec):
        if cfg.compile != "none":  # as for the built-in language models (config_checks)
            raise ConfigError(with_hint(
                f"--compile {cfg.compile}: '{cfg.model}' returned a model spec, whose grid "
                "stages are not compiled yet", "drop --compile"))
        if cfg.sequence_parallel and not made.sequence_parallel:
            raise ConfigError(with_hint(
                f"--sequence-parallel: the spec '{cfg.model}' returned does not split the "
                "sequence (its forward must take sequence-split activations)",
                "set ParallelSpec(sequence_parallel=cfg.sequence_parallel) once its forward "
                "does (see llama_forward), or drop --sequence-parallel"))
        return made
    raise ConfigError(with_hint(
        f"'{cfg.model}' returned a {type(made).__name__}",
        "return an nn.Module, or a mpitrain.parallel.spec.ParallelSpec"))


def build_model(cfg: TrainConfig, feature_shape: Sequence[int], num_classes: int,
                spec: ClassifierSpec | None = None) -> nn.Module:
    """Build the classifier ``cfg.model`` names (or ``spec``) for inputs of ``feature_shape``."""
    found = spec if spec is not None else resolve_model(cfg)
    if not isinstance(found, ClassifierSpec):
        raise ConfigError(with_hint(
            f"--model {cfg.model} is a language model", "it trains on the text corpus "
            "(or --data token shards) through the grid trainer, not on labelled samples"))
    module = found.build(feature_shape, num_classes)
    if found.rng_after is not None:  # as if built here, after torch.manual_seed(cfg.seed)
        torch.set_rng_state(found.rng_after)
    return module


def resolve_seeded(cfg: TrainConfig) -> ClassifierSpec | StageBuilder:
    """:func:`resolve_model` with the generator seeded by ``cfg.seed`` and restored after, so
    a user's factory builds the same module as if :func:`build_model` built it later."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        spec = resolve_model(cfg)
        if isinstance(spec, ClassifierSpec):
            return ClassifierSpec(spec.name, spec.build, torch.get_rng_state())
        return spec


def check_classifier(cfg: TrainConfig, spec: ClassifierSpec | None) -> None:
    """Refuse model-parallel options for a classifier (a user's factory made an nn.Module)."""
    if spec is None or (cfg.tensor_parallel == 1 and cfg.pipeline_stages == 1):
        return
    raise ConfigError(with_hint(
        f"--tensor-parallel and --pipeline-stages split a model spec, and '{cfg.model}' "
        "returned an nn.Module",
        "return a mpitrain.parallel.spec.ParallelSpec (docs/model-parallel.md), or drop them"))


def describe_stage_error(spec: StageBuilder, exc: ValueError) -> ConfigError:
    """A spec's refusal (a plan or split that does not fit) as a one-line config error."""
    return ConfigError(with_hint(f"--model {spec.name}: {exc}",
                                 "fix the spec's plan, or change --tensor-parallel / "
                                 "--pipeline-stages"))


def _load_factory(spec: str):  # type: ignore[no-untyped-def]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            with_hint(f"cannot import model module '{module_name}': {exc}", "check PYTHONPATH")
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            with_hint(
                f"'{spec}' is not a callable factory", f"define {attr}(config) in {module_name}"
            )
        )
    return factory


def build_spec_stage(spec: StageBuilder, grid: Grid, world: World, device: torch.device,
                     virtual: int = 1, checkpointing: str = "none") -> nn.Module:
    """Collective: check ``spec`` fits the grid (the same answer on every rank: its plan and
    split on the meta device), then build this rank's stage; with ``virtual`` > 1 (the
    interleaved schedule) its chunks, chunk ``c`` being global stage ``c * P + rank``.
    ``checkpointing``: a :class:`ParallelSpec`'s blocks are checkpointed (activation
    checkpointing; the built-in GPT takes it from its config)."""
    from mpitrain.parallel.checkpointing import apply_activation_checkpointing
    from mpitrain.parallel.chunks import StageChunks
    from mpitrain.runtime.collective import agree

    stages = grid.pipeline * virtual

    def check() -> None:
        try:
            spec.check(grid.tensor, stages)
        except ValueError as exc:
            raise describe_stage_error(spec, exc) from None

    agree(world.comm, check)
    chunks = [spec.build_stage(grid.tp_comm, c * grid.pipeline + grid.pp_rank, stages, device)
              for c in range(virtual)]
    for chunk in chunks:
        if isinstance(chunk, SpecStage):  # its blocks: also ZeRO-3's gather units
            apply_activation_checkpointing(chunk.own_blocks(), checkpointing)
    return (chunks[0] if virtual == 1 else StageChunks(chunks)).to(device)
