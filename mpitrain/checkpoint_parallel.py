"""Model-parallel checkpoints: one file per (pipeline stage, tensor rank), joined on demand.

The files and the manifest are :mod:`mpitrain.checkpoint_shards`' (written by the ranks of
data-parallel index 0, file k for grid position ``stage * tensor + tensor_rank``). The
manifest holds ``kind: "model-parallel"``, the grid and, per stage, each parameter's merge
rule ``[split dim or None, interleave, dropped]``; :func:`merge_parallel` turns the slices
back into the dense model's ``state_dict`` (``python -m mpitrain checkpoint consolidate``).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Return ``{"model": dense state_dict, "meta": ...}`` of a model-parallel checkpoint."""
    tensor, pipeline = int(doc["grid"]["tensor"]), int(doc["grid"]["pipeline"])
    if len(payloads) != tensor * pipeline:
        raise CheckpointError(f"model-parallel checkpoint has {len(payloads)} files, its grid "
                              f"tensor {tensor} x pipeline {pipeline} needs {tensor * pipeline}")
    states = [[payloads[s * tensor + t]["model"] for t in range(tensor)]
              for s in range(pipeline)]
    return {"model": merge_parallel(doc["rules"], states), "meta": doc.get("meta", {})}
