"""Does a checkpoint hold what this run asks for? Compared before anything is loaded.

Every checkpoint kind (plain trainer files, ZeRO shards, model-parallel grids, the Python API's
``load_sharded``) describes what it holds and what the run has built in the same terms —
parameter names and shapes, the optimizer's type, its hyperparameter keys and state keys — and
:func:`check` refuses a difference with one line that names it and the options the checkpoint
was saved with. Nothing is loaded (and nothing on disk changes) before the check passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpitrain.errors import CheckpointError, with_hint

#: options that decide what a checkpoint holds (named in the refusal when they differ)
SHAPE_OPTIONS = (
    "model", "hidden", "layers", "heads", "context", "optimizer", "momentum", "nesterov",
    "shard", "tensor_parallel", "pipeline_stages", "precision",
)


@dataclass(frozen=True)
class Holds:
    """What a checkpoint holds, or what a run needs, compared by :func:`differences`."""

    #: tensor name -> shape (model parameters and buffers, unsharded)
    tensors: dict[str, tuple[int, ...]]
    #: optimizer class name (None: not known, e.g. a checkpoint that records only a state dict)
    optimizer: str | None = None
    #: per param group: its hyperparameter keys and its number of parameters
    groups: tuple[tuple[tuple[str, ...], int], ...] | None = None
    #: per-parameter state keys the optimizer holds (empty for a fresh optimizer)
    state_keys: frozenset[str] = field(default_factory=frozenset)


def tensor_shapes(pairs: Iterable[tuple[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Return ``{name: shape}`` of (name, tensor or shape) pairs."""
    out: dict[str, tuple[int, ...]] = {}
    for name, value in pairs:
        shape = value.shape if isinstance(value, torch.Tensor) else value
        out[str(name)] = tuple(int(d) for d in shape)
    return out


def optimizer_holds(state_dict: Mapping[str, Any]) -> tuple[
        tuple[tuple[tuple[str, ...], int], ...], frozenset[str]]:
    """Return (groups, state keys) of an optimizer ``state_dict()``."""
    groups = tuple(
        (tuple(sorted(k for k in g if k != "params")), len(g.get("params", ())))
        for g in state_dict.get("param_groups", ())
    )
    keys: set[str] = set()
    for entry in state_dict.get("state", {}).values():
        if isinstance(entry, Mapping):
            keys.update(str(k) for k in entry)
    return groups, frozenset(keys)


def of_optimizer(optimizer: torch.optim.Optimizer) -> tuple[
        str, tuple[tuple[tuple[str, ...], int], ...], frozenset[str]]:
    """Return (type name, groups, state keys) of a live optimizer (wrappers unwrapped)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups, keys = optimizer_holds(inner.state_dict())
    return type(inner).__name__, groups, keys


def _shape(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def differences(saved: Holds, now: Holds) -> list[str]:
    """Return the differences between what is saved and what the run needs, in words."""
    out: list[str] = []
    missing = [n for n in now.tensors if n not in saved.tensors]
    extra = [n for n in saved.tensors if n not in now.tensors]
    for name, shape in now.tensors.items():
        there = saved.tensors.get(name)
        if there is not None and tuple(there) != tuple(shape):
            out.append(f"'{name}' is {_shape(there)} there, {_shape(shape)} now")
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        out.append(f"it has no '{missing[0]}'{more}")
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        out.append(f"it holds '{extra[0]}'{more}, which this model does not have")
    if saved.optimizer and now.optimizer and saved.optimizer != now.optimizer:
        out.append(f"optimizer {saved.optimizer} there, {now.optimizer} now")
    elif saved.groups is not None and now.groups is not None:
        if len(saved.groups) != len(now.groups):
            out.append(f"{len(saved.groups)} optimizer param groups there, {len(now.groups)} now")
        else:
            for i, ((ka, na), (kb, nb)) in enumerate(zip(saved.groups, now.groups, strict=True)):
                if ka != kb:
                    only = sorted(set(ka) - set(kb)) or sorted(set(kb) - set(ka))
                    out.append(f"optimizer param group {i} has other hyperparameters "
                               f"({', '.join(only)}): another optimizer type")
                    break
                if na != nb:
                    out.append(f"optimizer param group {i} has {na} parameters there, {nb} now")
                    break
    if (not out and saved.state_keys and now.state_keys
            and saved.state_keys != now.state_keys):
        out.append(f"optimizer state keys {sorted(saved.state_keys)} there, "
                   f"{sorted(now.state_keys)} now")
    return out


def _options(config: Mapping[str, Any] | None, keys: Iterable[str]) -> str:
    if not config:
        return ""
    return " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in keys if k in config)


def check(what: str, saved: Holds, now: Holds, *,
          saved_config: Mapping[str, Any] | None = None,
          now_config: Mapping[str, Any] | None = None) -> None:
    """Raise a one-line CheckpointError when ``saved`` is not what the run needs.

    ``what`` names the checkpoint (its path). The options that decide the shapes and that
    differ between ``saved_config`` and ``now_config`` are named; if none differ, the ones
    the checkpoint was saved with are.
    """
    diffs = differences(saved, now)
    if not diffs:
        return
    text = "; ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")
    options = ""
    if saved_config is not None:
        keys = [k for k in SHAPE_OPTIONS if k in saved_config]
        if now_config is not None:
            changed = [k for k in keys if saved_config.get(k) != now_config.get(k)]
            if changed:
                options = (f"; saved with {_options(saved_config, changed)}, this run has "
                           f"{_options(now_config, changed)}")
        if not options:
            options = f"; saved with {_options(saved_config, keys)}"
    raise CheckpointError(with_hint(
        f"'{what}' holds another model or optimizer than this run builds: {text}{options}",
        "resume with the options it was saved with, or start a fresh run in another "
        "--checkpoint-dir"))
