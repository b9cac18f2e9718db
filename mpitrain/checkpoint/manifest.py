"""What a sharded checkpoint's manifest and shard payloads must hold, checked field by field.

A manifest (:mod:`mpitrain.checkpoint.shards`) that is not an object, lacks a field or holds
the wrong kind of value, names a file outside its directory or describes a layout its own
numbers contradict is refused with one line naming the file and the field
(``'files[1].sha256' must be 64 lowercase hex digits``), before any shard is read; a shard
whose payload does not fit the manifest is named as well. Both are
:class:`~mpitrain.errors.CheckpointError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mpitrain.checkpoint.reshard import KIND as KIND_PARALLEL
from mpitrain.errors import CheckpointError
from mpitrain.runtime.files import name_problem
from mpitrain.runtime.tool_io import Fields

FORMAT = 1

HINT = "pass a checkpoint directory mpitrain wrote (its manifest is written last)"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_RANKS = 1 << 20


def check_manifest(raw: Any, path: Path) -> dict[str, Any]:
    """Return ``raw`` (a parsed manifest read from ``path``) once its structure is checked.

    Raises:
        CheckpointError: naming the first field that is missing or of the wrong kind.
    """
    f = Fields(path, "checkpoint manifest", hint=HINT, error=CheckpointError)
    doc = f.as_obj(raw)
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"'{path}': unknown sharded checkpoint format {fmt!r}")
    ranks = f.as_int(f.need(doc, "ranks"), "ranks", 1, _MAX_RANKS)
    for i, entry in enumerate(f.as_list(f.need(doc, "files"), "files", ranks)):
        key = f"files[{i}]"
        f.as_obj(entry, key)
        name = f.as_str(f.need(entry, "name", key), f"{key}.name")
        problem = name_problem(name)
        if problem is not None:
            f.fail(f"{key}.name", f"{name!r} {problem}: a shard is a file of the checkpoint "
                                  "directory")
        if not _SHA.match(f.as_str(f.need(entry, "sha256", key), f"{key}.sha256")):
            f.fail(f"{key}.sha256", "must be 64 lowercase hex digits")
        f.as_int(f.need(entry, "bytes", key), f"{key}.bytes")
    if "kind" in doc and doc["kind"] != KIND_PARALLEL:
        f.fail("kind", f"{doc['kind']!r} is not a kind of sharded checkpoint "
                       f"({KIND_PARALLEL!r} or none)")
    if doc.get("kind") == KIND_PARALLEL:
        _check_parallel(f, doc, ranks)
    else:
        _check_layout(f, doc, ranks)
    return doc


def _check_layout(f: Fields, doc: dict[str, Any], ranks: int) -> None:
    """The flat layout of a sharded data-parallel checkpoint: buckets, params, state keys."""
    layout = f.as_obj(f.need(doc, "layout"), "layout")
    buckets = f.as_list(f.need(layout, "buckets", "layout"), "layout.buckets")
    spans = []
    for b, span in enumerate(buckets):
        key = f"layout.buckets[{b}]"
        offset, chunk = f.as_list(span, key, 2)
        spans.append((f.as_int(offset, key), f.as_int(chunk, key)))
    total = sum(chunk for _, chunk in spans) * ranks
    for b, (offset, chunk) in enumerate(spans):
        if offset + chunk * ranks > total:
            f.fail(f"layout.buckets[{b}]", f"reaches past the {total} elements of the layout")
    for i, param in enumerate(f.as_list(f.need(layout, "params", "layout"), "layout.params")):
        key = f"layout.params[{i}]"
        name, shape, offset = f.as_list(param, key, 3)
        f.as_str(name, key)
        numel = 1
        for d in f.as_list(shape, f"{key}[1]"):
            numel *= f.as_int(d, f"{key}[1]")
        if f.as_int(offset, f"{key}[2]") + numel > total:
            f.fail(key, f"reaches past the {total} elements of the layout")
    for i, name in enumerate(f.as_list(f.need(doc, "state_keys"), "state_keys")):
        f.as_str(name, f"state_keys[{i}]")


def _check_parallel(f: Fields, doc: dict[str, Any], ranks: int) -> None:
    """The grid and per-stage merge rules of a model-parallel checkpoint."""
    grid = f.as_obj(f.need(doc, "grid"), "grid")
    tensor, pipeline = (f.as_int(f.need(grid, k, "grid"), f"grid.{k}", 1, _MAX_RANKS)
                        for k in ("tensor", "pipeline"))
    if tensor * pipeline != ranks:
        f.fail("grid", f"tensor {tensor} x pipeline {pipeline} needs {tensor * pipeline} files, "
                       f"'ranks' says {ranks}")
    f.as_int(f.need(doc, "step"), "step")
    for s, stage in enumerate(f.as_list(f.need(doc, "rules"), "rules", pipeline)):
        for name, rule in f.as_obj(stage, f"rules[{s}]").items():
            key = f"rules[{s}].{name}"
            dim, interleave, dropped = f.as_list(rule, key, 3)
            if dim is not None:
                f.as_int(dim, f"{key}[0]", 0, 64)
            f.as_int(interleave, f"{key}[1]", 1)
            f.as_bool(dropped, f"{key}[2]")


def payload_problem(doc: dict[str, Any], payload: dict[str, Any]) -> str | None:
    """Why ``payload`` cannot be one of ``doc``'s shards (None: it can)."""
    if doc.get("kind") == KIND_PARALLEL:
        model = payload.get("model")
        if not isinstance(model, dict) or not all(
                isinstance(t, torch.Tensor) for t in model.values()):
            return "has no 'model' state_dict of tensors"
        return None
    for key, kind in (("flat", dict), ("optim", dict), ("buffers", dict)):
        if not isinstance(payload.get(key), kind):
            return f"has no '{key}' {kind.__name__}"
    if not isinstance(payload["optim"].get("state"), dict) or not isinstance(
            payload["optim"].get("param_groups"), list):
        return "has no optimizer 'state' and 'param_groups'"
    for b, (_offset, chunk) in enumerate(doc["layout"]["buckets"]):
        part = payload["flat"].get(b)
        if not isinstance(part, torch.Tensor) or part.dim() != 1 or part.numel() != chunk:
            got = f"shape {tuple(part.shape)}" if isinstance(part, torch.Tensor) else \
                type(part).__name__
            return f"holds {got} for bucket {b}, the manifest's layout says {chunk} elements"
    return None
