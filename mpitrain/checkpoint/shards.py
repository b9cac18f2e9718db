"""Sharded checkpoints: one file per rank, a manifest written last, re-sharding on load.

A sharded checkpoint is a directory::

    shard-00000-of-00004.pt ... shard-00003-of-00004.pt   one per rank (torch.save payload)
    manifest.json                                         written last, by rank 0

Each rank writes its own file atomically (temporary name, fsync, rename); rank 0 then writes
``manifest.json`` (atomically as well) with every file's SHA-256 and byte count and the flat
layout (buckets, chunk per rank, each parameter's name, shape and offset). A directory without
a manifest is an unfinished checkpoint; a file whose checksum differs is damaged. Both raise
:class:`~mpitrain.errors.CheckpointError` naming the file.

A rank's payload holds, per bucket ``b``, its chunk of the flat parameters
(``payload["flat"][b]``) and of every elementwise optimizer state tensor
(``payload["optim"]["state"][b]``, as ``optimizer.state_dict()`` keys it: the optimizer is
built over one shard Parameter per bucket). :func:`consolidate` joins the chunks, drops the
padding and splits them per parameter, so a checkpoint written by N ranks is read back on any
M (the loader slices the per-parameter tensors to its own layout) and turned into a plain
``state_dict`` (``python -m mpitrain checkpoint consolidate DIR OUT``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.checkpoint.manifest import FORMAT, HINT, check_manifest, payload_problem
from mpitrain.errors import CheckpointError, MpitrainError, with_hint
from mpitrain.runtime.collective import agree
from mpitrain.runtime.files import write_atomic, write_failure
from mpitrain.runtime.tool_io import check_output_file, read_bytes, read_json

if TYPE_CHECKING:
    from mpi4py import MPI

MANIFEST = "manifest.json"


def shard_name(rank: int, size: int) -> str:
    """File name of ``rank``'s shard in a checkpoint of ``size`` ranks."""
    return f"shard-{rank:05d}-of-{size:05d}.pt"


def save_shards(
    directory: Path, payload: dict[str, Any], manifest: dict[str, Any], comm: MPI.Intracomm
) -> Path:
    """Collective: write this rank's ``payload``, then (rank 0) the manifest; return its path.

    ``manifest`` must hold ``layout`` (see :meth:`ShardLayout.manifest`) and ``state_keys``
    (the module's state_dict keys in order); ``ranks``, ``format`` and ``files`` are added.
    A failure on any rank (no space, no permission) raises the same CheckpointError on all.
    """
    directory = Path(directory)

    def make_dir() -> None:
        if comm.rank == 0:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"cannot create '{directory}': {exc}") from exc

    agree(comm, make_dir)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = directory / shard_name(comm.rank, comm.size)

    def write() -> None:
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise CheckpointError(write_failure(path, exc, len(data))) from exc

    agree(comm, write)
    entry = {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    entries = comm.gather(entry, root=0)
    out = directory / MANIFEST

    def write_manifest() -> None:
        if entries is None:
            return
        doc = {**manifest, "format": FORMAT, "ranks": comm.size, "files": entries}
        text = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            write_atomic(out, text)
        except OSError as exc:
            raise CheckpointError(write_failure(out, exc, len(text))) from exc

    agree(comm, write_manifest)
    return out


def read_manifest(directory: Path) -> dict[str, Any]:
    """Return the manifest of the sharded checkpoint in ``directory``, its structure checked.

    Raises:
        CheckpointError: no manifest (an unfinished save), or one that cannot be read or is
            not a manifest: one line naming the file and the field.
    """
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise CheckpointError(
            with_hint(f"'{directory}' is a file, not a sharded checkpoint directory",
                      "pass the directory that holds manifest.json (a plain checkpoint file "
                      "loads with torch.load as it is)"))
    if not path.exists():
        raise CheckpointError(
            with_hint(f"'{path}' does not exist: '{directory}' is not a finished sharded "
                      "checkpoint", "resume from an earlier checkpoint; the manifest is "
                      "written last, so this save did not complete")
        )
    raw = read_json(path, "checkpoint manifest", hint=HINT, error=CheckpointError)
    return check_manifest(raw, path)


def read_shards(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (manifest, every rank's payload), verifying each file's SHA-256."""
    directory = Path(directory)
    doc = read_manifest(directory)
    payloads = [read_shard(directory, entry) for entry in doc["files"]]
    for entry, payload in zip(doc["files"], payloads, strict=True):
        problem = payload_problem(doc, payload)
        if problem is not None:
            raise CheckpointError(with_hint(f"shard '{directory / entry['name']}' {problem}",
                                            "the files were changed or mixed from two saves; "
                                            "use another checkpoint"))
    return doc, payloads


def read_shard(directory: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Return one file's payload (``entry`` from the manifest), verifying its SHA-256."""
    path = Path(directory) / entry["name"]
    data = read_bytes(path, "shard", hint="resume from or consolidate another checkpoint",
                      error=CheckpointError)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            with_hint(f"shard '{path}' is damaged: its SHA-256 differs from the "
                      f"manifest's ({len(data)} bytes, {entry['bytes']} expected)",
                      "resume from an earlier checkpoint")
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: one line naming the file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(with_hint(f"shard '{path}' is not a checkpoint file torch can "
                                        f"load ({reason})", HINT)) from None
    if not isinstance(payload, dict):
        raise CheckpointError(with_hint(f"shard '{path}' holds {type(payload).__name__}, not a "
                                        "shard payload (a dict)", HINT))
    return payload


def _split(flat: torch.Tensor, params: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape, offset in params:
        n = 1
        for d in shape:
            n *= int(d)
        out[str(name)] = flat[offset : offset + n].reshape(shape).clone()
    return out


def _join(layout: dict[str, Any], chunks: Sequence[dict[int, torch.Tensor]]) -> torch.Tensor:
    """Reassemble the full flat vector from every rank's per-bucket chunks."""
    buckets = layout["buckets"]
    ranks = len(chunks)
    total = sum(int(c) * ranks for _o, c in buckets)
    first = chunks[0][0] if buckets else torch.zeros(0)
    full = torch.zeros(total, dtype=first.dtype)
    for b, (offset, chunk) in enumerate(buckets):
        for r, part in enumerate(chunks):
            full[offset + r * chunk : offset + (r + 1) * chunk] = part[b]
    return full


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def consolidate(doc: dict[str, Any], payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join the ranks' chunks into full per-parameter tensors (padding dropped).

    Returns ``{"model": state_dict, "optim_state": {name: {key: value}}, "param_groups": ...,
    "extra": rank 0's extra}``: elementwise optimizer state is split per parameter; other
    state (``step``) is copied to every parameter (rank 0's, from the first bucket).
    """
    layout = doc["layout"]
    params = layout["params"]
    model = _split(_join(layout, [p["flat"] for p in payloads]), params)
    optim: dict[str, dict[str, Any]] = {}
    states = [p["optim"]["state"] for p in payloads]
    if states[0]:
        first = states[0][min(states[0])]
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                chunks = [{b: st[b][key] for b in st} for st in states]
                for name, t in _split(_join(layout, chunks), params).items():
                    optim.setdefault(name, {})[key] = t
            else:
                for name, _shape, _offset in params:  # one copy each: Adam adds to `step`
                    optim.setdefault(str(name), {})[key] = _copy(value)
    model.update(payloads[0]["buffers"])
    ordered = {k: model[k] for k in doc["state_keys"]}
    groups = payloads[0]["optim"]["param_groups"]
    return {"model": ordered, "optim_state": optim, "param_groups": groups,
            "extra": payloads[0].get("extra", {})}


def optimizer_state_dict(full: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Return a ``state_dict`` for an unsharded optimizer over the parameters ``names`` (in
    order, one param group), from :func:`consolidate`'s result.
    """
    groups = full["param_groups"]
    if len(groups) != 1:
        raise CheckpointError(f"sharded optimizer state has {len(groups)} param groups; "
                              "only one is supported")
    state = {i: {k: _copy(v) for k, v in full["optim_state"][n].items()}
             for i, n in enumerate(names) if n in full["optim_state"]}
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(names)))}]}


def load_full(directory: Path) -> dict[str, Any]:
    """Read and consolidate the sharded checkpoint in ``directory`` (see :func:`consolidate`).

    A model-parallel checkpoint (``kind`` in the manifest) is joined by
    :func:`mpitrain.checkpoint.reshard.consolidate_parallel` instead.

    Raises:
        CheckpointError: a file cannot be read or verified, or the files do not fit their
            manifest (one line naming the checkpoint).
    """
    doc, payloads = read_shards(directory)
    try:
        if doc.get("kind") == "model-parallel":
            from mpitrain.checkpoint.reshard import consolidate_parallel

            return consolidate_parallel(doc, payloads)
        return consolidate(doc, payloads)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            with_hint(f"checkpoint '{directory}': its shard files do not fit its manifest "
                      f"({type(exc).__name__} {reason})".rstrip(),
                      "the files were changed or mixed from two saves; use another "
                      "checkpoint")
        ) from None


def write_consolidated(directory: Path, out: Path) -> dict[str, torch.Tensor]:
    """Write the plain full ``state_dict`` of ``directory``'s checkpoint to ``out`` (atomic)."""
    state: dict[str, torch.Tensor] = load_full(directory)["model"]
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        write_atomic(Path(out), data)
    except OSError as exc:
        raise CheckpointError(write_failure(Path(out), exc, len(data))) from exc
    return state


def main(argv: Sequence[str]) -> int:
    """``python -m mpitrain checkpoint consolidate DIR OUT``: no MPI needed."""
    parser = argparse.ArgumentParser(prog="python -m mpitrain checkpoint",
                                     description="Work with sharded checkpoints.")
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("consolidate", help="write a plain full state_dict for torch.load")
    c.add_argument("directory", type=Path, help="a sharded checkpoint (holds manifest.json)")
    c.add_argument("out", type=Path, help="the .pt file to write")
    args = parser.parse_args(list(argv))
    try:
        check_output_file(args.out, "OUT", hint="give a .pt file name in a writable directory",
                          example="model.pt")
        state = write_consolidated(args.directory, args.out)
    except MpitrainError as exc:
        print(f"mpitrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    numel = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {numel} elements")
    return 0
