"""Save, find and load model-parallel checkpoints of a grid (files: ``checkpoint_parallel``).

A checkpoint is ``DIR/mp-step-SSSSSSSS/`` with one file per (stage, tensor rank), written by
the ranks of data-parallel index 0 (the replicas hold the same state), and a manifest
written last. Resuming needs the same tensor x pipeline grid (any data-parallel size: the
sampler state is global); ``python -m mpitrain checkpoint consolidate`` turns one into the
dense model's ``state_dict`` for any other use.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mpitrain.checkpoint_parallel import KIND
from mpitrain.checkpoint_shards import MANIFEST, read_manifest, read_shard, save_shards
from mpitrain.errors import CheckpointError, MpitrainError, with_hint
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.parallel.grid import Grid

PREFIX = "mp-step-"


def step_dir(directory: Path, step: int) -> Path:
    """The checkpoint directory of optimizer step ``step``."""
    return Path(directory) / f"{PREFIX}{step:08d}"


def finished(directory: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """Return (step, path, manifest) of every finished model-parallel checkpoint, oldest first.

    Directories without a readable manifest (a save that did not finish) are skipped.
    """
    out: list[tuple[int, Path, dict[str, Any]]] = []
    root = Path(directory)
    if not root.is_dir():
        return out
    for path in sorted(root.glob(f"{PREFIX}*")):
        if not (path / MANIFEST).is_file():
            continue
        try:
            doc = read_manifest(path)
        except CheckpointError:
            continue
        if doc.get("kind") == KIND:
            out.append((int(doc["step"]), path, doc))
    return sorted(out, key=lambda t: t[0])


def save_parallel(
    grid: Grid, directory: Path, step: int, payload: dict[str, Any],
    rules: dict[str, list[Any]], meta: dict[str, Any], *, run_id: str, keep_last: int,
) -> Path:
    """Collective (grid): write this step's checkpoint; keep this run's last ``keep_last``.

    Every rank passes its payload; only data-parallel index 0 writes. A failure on any
    writer raises the same CheckpointError on every rank of the grid.
    """
    from mpi4py import MPI

    path = step_dir(directory, step)
    position = grid.pp_rank * grid.tensor + grid.tp_rank
    writers = grid.comm.Split(0 if grid.dp_rank == 0 else MPI.UNDEFINED, position)
    error: str | None = None
    if writers != MPI.COMM_NULL:
        wcomm = cast("MPI.Intracomm", writers)
        staged = wcomm.gather((grid.pp_rank, grid.tp_rank, rules), root=0)
        per_stage: list[dict[str, list[Any]]] = [{} for _ in range(grid.pipeline)]
        for pp, tp, r in staged or []:
            if tp == 0:
                per_stage[pp] = r
        manifest = {
            "kind": KIND, "step": step, "run_id": run_id, "meta": meta, "rules": per_stage,
            "grid": {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data},
        }
        try:
            save_shards(path, payload, manifest, wcomm)
        except MpitrainError as exc:
            error = str(exc)
        wcomm.Free()
    errors = [e for e in grid.comm.allgather(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    agree(grid.comm, lambda: _prune(grid.comm, Path(directory), run_id, keep_last))
    return path


def _prune(comm: MPI.Intracomm, directory: Path, run_id: str, keep_last: int) -> None:
    if comm.rank != 0:
        return
    ours = [p for _, p, doc in finished(directory) if doc.get("run_id") == run_id]
    for old in ours[:-keep_last]:
        try:
            shutil.rmtree(old)
        except OSError as exc:
            raise CheckpointError(f"cannot remove old checkpoint '{old}': {exc}") from exc


def _decide(directory: Path | None, resume: str | None) -> str | None:
    """Rank 0's choice of the checkpoint to resume from (see :func:`choose_resume`)."""
    found = finished(directory) if directory is not None else []
    if resume == "auto":
        return str(found[-1][1]) if found else None
    if resume is None:
        if found:
            raise CheckpointError(with_hint(
                f"--checkpoint-dir '{directory}' holds checkpoints of run "
                f"{found[-1][2].get('run_id')}; a fresh run would mix its files with them",
                "pass --resume auto to continue it, or use another --checkpoint-dir"))
        return None
    doc = read_manifest(Path(resume))
    later = [step for step, _, d in found
             if d.get("run_id") == doc.get("run_id") and step > int(doc.get("step", 0))]
    if later:
        raise CheckpointError(with_hint(
            f"'{resume}' is step {doc.get('step')} of run {doc.get('run_id')}, which has later "
            f"checkpoints in '{directory}' (step {max(later)}): going on from here would prune "
            "or overwrite them", "use --resume auto, or copy this checkpoint into a new "
            "--checkpoint-dir and resume from there"))
    return resume


def choose_resume(comm: MPI.Intracomm, directory: Path | None, resume: str | None) -> Path | None:
    """Collective: the checkpoint to resume from (None: a fresh run), decided on rank 0.

    A fresh run into a directory of checkpoints, and rewinding a run that has later
    checkpoints there, are refused (on every rank, with the same message).
    """
    choice = agree(comm, lambda: _decide(directory, resume) if comm.rank == 0 else None)
    chosen = comm.bcast(choice, root=0)
    return None if chosen is None else Path(chosen)


def load_parallel(
    grid: Grid, path: Path, meta: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective (grid): return (this rank's payload, the manifest) of checkpoint ``path``.

    ``meta`` (the model's shape) must match the saved one: a different model is refused.
    """
    def read() -> tuple[dict[str, Any], dict[str, Any]]:
        doc = read_manifest(path)
        saved_meta = doc.get("meta", {})
        differ = {k: (saved_meta.get(k), v) for k, v in (meta or {}).items()
                  if k in saved_meta and saved_meta[k] != v}
        if differ:
            text = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in differ.items())
            raise CheckpointError(with_hint(
                f"'{path}' holds another model: {text}",
                "resume with the model options it was saved with"))
        if doc.get("kind") != KIND or "grid" not in doc or "files" not in doc:
            raise CheckpointError(
                with_hint(f"'{path}' is not a model-parallel checkpoint",
                          "resume --model gpt from an mp-step-* directory it wrote"))
        saved = doc["grid"]
        if (saved["tensor"], saved["pipeline"]) != (grid.tensor, grid.pipeline):
            raise CheckpointError(
                with_hint(f"'{path}' was written by a grid of tensor {saved['tensor']} x "
                          f"pipeline {saved['pipeline']}; this run is tensor {grid.tensor} x "
                          f"pipeline {grid.pipeline}",
                          "resume on the same tensor/pipeline sizes (the data-parallel size "
                          "may differ), or consolidate it: python -m mpitrain checkpoint "
                          "consolidate DIR OUT.pt"))
        entry = doc["files"][grid.pp_rank * grid.tensor + grid.tp_rank]
        return read_shard(path, entry), doc

    return agree(grid.comm, read)
