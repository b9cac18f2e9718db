"""Built-in models and the loader for user model factories (``package.module:factory``)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpitrain.config import TrainConfig


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


def build_model(cfg: TrainConfig, feature_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model named by ``cfg.model`` for inputs of ``feature_shape``."""
    in_features = math.prod(feature_shape)
    if cfg.model == "mlp":
        return MLP(in_features, num_classes, cfg.hidden)
    if cfg.model == "cnn":
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ConfigError(
                with_hint(
                    f"model 'cnn' needs square single-channel inputs, "
                    f"got shape {tuple(feature_shape)}",
                    "use --model mlp or your own --model package.module:factory",
                )
            )
        return SmallCNN(side, num_classes)
    if ":" in cfg.model:
        module: nn.Module = _load_factory(cfg.model)(cfg)
        return module
    raise ConfigError(
        with_hint(f"unknown model '{cfg.model}'", "use mlp, cnn or package.module:factory")
    )


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
