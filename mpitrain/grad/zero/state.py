"""Sharded checkpoints of a ShardedDataParallel model and its optimizer (save, load N -> M).

The files and the manifest are :mod:`mpitrain.checkpoint.shards`'; this module knows the
wrapper: what a rank's payload holds and how a consolidated (per-parameter) state is cut into
this rank's shards of the current layout, whatever the number of ranks that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.checkpoint import compat
from mpitrain.checkpoint.shards import load_full, save_shards
from mpitrain.errors import CheckpointError, ConfigError, with_hint
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    from mpitrain.grad.zero.wrapper import ShardedDataParallel


def _check_optimizer(model: ShardedDataParallel, optimizer: torch.optim.Optimizer) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(optimizer.param_groups) != 1 or len(params) != len(model.shards) or any(
        a is not b for a, b in zip(params, model.shards, strict=True)
    ):
        raise ConfigError(
            with_hint("the optimizer is not built over the model's shard parameters",
                      "build it as torch.optim.X(model.parameters(), ...) with one param group")
        )


def shard_payload(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """Return what this rank writes: its chunks, its optimizer state, rank 0's buffers."""
    _check_optimizer(model, optimizer)
    names = {s.name for s in model.layout.slots}
    buffers = {}
    if model.comm.rank == 0:
        buffers = {k: v.detach().to("cpu", copy=True)
                   for k, v in model.module.state_dict().items() if k not in names}
    return {  # host copies: a checkpoint loads on any device (or none)
        "flat": {b: s.detach().to("cpu", copy=True) for b, s in enumerate(model.shards)},
        "optim": optimizer.state_dict(),
        "buffers": buffers,
        "extra": extra or {},
    }


def save_sharded(
    model: ShardedDataParallel,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective: write a sharded checkpoint of ``model`` and ``optimizer`` to ``directory``."""
    manifest = {
        "layout": model.layout.manifest(),
        "state_keys": list(model.module.state_dict()),
        "stage": model.stage,
    }
    return save_shards(Path(directory), shard_payload(model, optimizer, extra), manifest,
                       model.comm)


def load_sharded(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer | None, directory: Path
) -> dict[str, Any]:
    """Collective: load a sharded checkpoint written on any number of ranks; returns ``extra``.

    Every rank reads every shard file (transiently the full model and optimizer state).
    """
    full = agree(model.comm, lambda: load_full(Path(directory)))
    load_consolidated(model, optimizer, full, what=str(directory))
    extra: dict[str, Any] = full["extra"]
    return extra


def check_consolidated(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer | None, full: dict[str, Any],
    what: str = "the checkpoint",
) -> None:
    """Refuse (one line) a consolidated state that holds another model or optimizer.

    Not collective: ``full`` is the same on every rank, so every rank decides alike.
    """
    slots = {s.name for s in model.layout.slots}
    now = compat.tensor_shapes([(s.name, s.shape) for s in model.layout.slots] + [
        (k, v) for k, v in model.module.state_dict().items() if k not in slots])
    saved_groups = None
    now_groups = None
    if optimizer is not None:
        saved_groups = tuple((tuple(sorted(k for k in g if k != "params")), 1)
                             for g in full["param_groups"])
        now_groups = tuple((tuple(sorted(k for k in g if k != "params")), 1)
                           for g in optimizer.param_groups)
    saved_keys: set[str] = set()
    for entry in full["optim_state"].values():
        saved_keys.update(entry)
    compat.check(
        what,
        compat.Holds(tensors=compat.tensor_shapes(full["model"].items()), groups=saved_groups,
                     state_keys=frozenset(saved_keys)),
        compat.Holds(tensors=now, groups=now_groups),
    )


def load_consolidated(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer | None, full: dict[str, Any],
    what: str = "the checkpoint",
) -> None:
    """Copy a consolidated state (``checkpoint.shards.consolidate``) into this rank's shards.

    What it holds is compared with ``model`` and ``optimizer`` first (one-line refusal).
    """
    check_consolidated(model, optimizer, full, what)
    if model.sharded is not None:  # stage 3: straight into the float32 master shards
        names = [slot.name for slot in model.layout.slots]
        model.sharded.load_({i: full["model"][n] for i, n in enumerate(names)
                             if n in full["model"]})
        rest = {k: v for k, v in full["model"].items() if k not in set(names)}
        result = model.module.load_state_dict(rest, strict=False)  # buffers
        if result.unexpected_keys:
            raise CheckpointError(f"checkpoint holds unknown keys {result.unexpected_keys}")
    else:
        model.module.load_state_dict(full["model"])  # copies into the flat buffer's views
    if optimizer is None:
        return
    _check_optimizer(model, optimizer)
    lay, rank = model.layout, model.comm.rank
    groups = full["param_groups"]
    if len(groups) != 1:
        raise CheckpointError(f"sharded optimizer state has {len(groups)} param groups; "
                              "only one is supported")
    saved = full["optim_state"]
    state: dict[int, dict[str, Any]] = {}
    named = [s for s in lay.slots if s.name in saved]
    if named:
        entry: dict[str, Any] = {}
        flats: dict[str, torch.Tensor] = {}
        for key, value in saved[named[0].name].items():
            if not (isinstance(value, torch.Tensor) and value.dim() >= 1):
                entry[key] = value
                continue
            flat = flats[key] = torch.zeros(lay.total, dtype=value.dtype)
            for s in named:
                flat[s.offset : s.offset + s.numel] = saved[s.name][key].reshape(-1)
        for b in range(len(lay.buckets)):
            lo, hi = lay.shard_range(b, rank)
            state[b] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in entry.items()}
            state[b].update({k: f[lo:hi].clone() for k, f in flats.items()})
    optimizer.load_state_dict(
        {"state": state, "param_groups": [{**groups[0], "params": list(range(len(lay.buckets)))}]}
    )
