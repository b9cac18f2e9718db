"""Model-parallel checkpoints: one file per (pipeline stage, tensor rank), joined on demand.

The files and the manifest are :mod:`mpitrain.checkpoint.shards`' (written by the ranks of
data-parallel index 0, file k for grid position ``stage * tensor + tensor_rank``). The
manifest holds ``kind: "model-parallel"``, the grid and, per stage, each parameter's merge
rule ``[split dim or None, interleave, dropped]``; :func:`merge_parallel` turns the slices
back into the dense model's ``state_dict`` (``python -m mpitrain checkpoint consolidate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mpitrain.errors import CheckpointError, with_hint

KIND = "model-parallel"
Rule = Sequence[Any]  # [dim | None, interleave, dropped]


def join(slices: Sequence[torch.Tensor], dim: int | None, interleave: int = 1) -> torch.Tensor:
    """Join one parameter's tensor-rank slices (``interleave`` blocks per slice)."""
    if dim is None:
        return slices[0].clone()
    if interleave == 1:
        return torch.cat(list(slices), dim=dim)
    parts = [s.chunk(interleave, dim=dim) for s in slices]
    return torch.cat([torch.cat([p[j] for p in parts], dim=dim) for j in range(interleave)],
                     dim=dim)


def split(full: torch.Tensor, dim: int | None, interleave: int, rank: int,
          size: int) -> torch.Tensor:
    """Return tensor rank ``rank``'s slice of ``full`` (the inverse of :func:`join`)."""
    if dim is None:
        return full.clone()
    if interleave == 1:
        return full.chunk(size, dim=dim)[rank].clone()
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in full.chunk(interleave, dim=dim)],
                     dim=dim).clone()


def merge_optimizer(
    rules: Sequence[dict[str, Rule]], optims: Sequence[Sequence[dict[str, Any]]],
    orders: Sequence[Sequence[str]],
) -> dict[str, dict[str, Any]]:
    """Return ``{parameter name: {state key: dense value}}`` from per-(stage, tensor rank)
    optimizer ``state_dict()``s; ``orders[stage]`` names a stage's parameters in optimizer
    order (its ``state_dict()`` order; the manifest's rules are sorted by name).

    State shaped like the parameter's slice (momentum, Adam moments) is joined like the
    parameter; anything else (``step``) is taken from tensor rank 0.
    """
    out: dict[str, dict[str, Any]] = {}
    for stage_rules, ranks, order in zip(rules, optims, orders, strict=True):
        for i, name in enumerate(order):
            dim, interleave, dropped = stage_rules[name]
            entries = [r.get("state", {}).get(i, r.get("state", {}).get(str(i))) for r in ranks]
            if dropped or entries[0] is None:
                continue
            dense: dict[str, Any] = {}
            for key, value in entries[0].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    dense[key] = join([e[key] for e in entries], dim, int(interleave))
                else:
                    dense[key] = value.clone() if isinstance(value, torch.Tensor) else value
            out[name] = dense
    return out


def merge_parallel(
    rules: Sequence[dict[str, Rule]], states: Sequence[Sequence[dict[str, torch.Tensor]]]
) -> dict[str, torch.Tensor]:
    """Return the dense ``state_dict`` from ``states[stage][tensor_rank]`` and per-stage rules."""
    out: dict[str, torch.Tensor] = {}
    for stage_rules, ranks in zip(rules, states, strict=True):
        for name, (dim, interleave, dropped) in stage_rules.items():
            if dropped:
                continue
            try:
                slices = [r[name] for r in ranks]
            except KeyError:
                raise CheckpointError(
                    with_hint(f"model-parallel checkpoint lacks parameter '{name}'",
                              "the files do not match their manifest; use another checkpoint")
                ) from None
            out[name] = join(slices, dim, int(interleave))
    return out


def consolidate_parallel(doc: dict[str, Any], payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return ``{"model": dense state_dict, "optim_state": {name: state}, "param_groups":
    ..., "meta": ...}`` of a model-parallel checkpoint."""
    tensor, pipeline = int(doc["grid"]["tensor"]), int(doc["grid"]["pipeline"])
    if len(payloads) != tensor * pipeline:
        raise CheckpointError(f"model-parallel checkpoint has {len(payloads)} files, its grid "
                              f"tensor {tensor} x pipeline {pipeline} needs {tensor * pipeline}")

    def grid_of(key: str) -> list[list[Any]]:
        return [[payloads[s * tensor + t].get(key, {}) for t in range(tensor)]
                for s in range(pipeline)]

    optims, models = grid_of("optim"), grid_of("model")
    groups = optims[0][0].get("param_groups", []) if optims and optims[0] else []
    orders = [[n for n in stage[0] if n in rules] for stage, rules in zip(
        models, doc["rules"], strict=True)]
    return {"model": merge_parallel(doc["rules"], models),
            "optim_state": merge_optimizer(doc["rules"], optims, orders), "param_groups": groups,
            "meta": doc.get("meta", {})}


def reshard(
    full: dict[str, Any], rules: Mapping[str, Rule], tied: Mapping[str, str], rank: int,
    size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Cut a consolidated model-parallel state for one (stage, tensor rank) of another grid.

    ``rules`` are the new stage's (its parameters in optimizer order); ``tied`` maps a
    dropped copy (the last stage's head) to the dense name it copies. Returns the stage's
    ``state_dict`` and its optimizer ``state_dict``.
    """
    model: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    for i, (name, (dim, interleave, _dropped)) in enumerate(rules.items()):
        source = tied.get(name, name)
        if source not in full["model"]:
            raise CheckpointError(with_hint(
                f"the checkpoint has no '{source}' for this grid's '{name}'",
                "resume with the model options it was saved with"))
        model[name] = split(full["model"][source], dim, int(interleave), rank, size)
        saved = full["optim_state"].get(source)
        if saved is not None:
            state[i] = {k: split(v, dim, int(interleave), rank, size)
                        if isinstance(v, torch.Tensor) and v.dim() > 0
                        else (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in saved.items()}
    groups = [{**g, "params": list(range(len(rules)))} for g in full["param_groups"][:1]]
    return model, {"state": state, "param_groups": groups}
