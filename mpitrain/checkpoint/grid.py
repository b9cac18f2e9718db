"""Save and load the model-parallel state of a grid (joined and re-cut by ``reshard``).

The state is a directory with one file per (stage, tensor rank), written by the ranks of
data-parallel index 0 (the replicas hold the same state), and a manifest written last; the
trainer's checkpoint file names it (:mod:`mpitrain.checkpoint.payload`), so runs, resume and
pruning follow the one checkpoint policy. A state written on another tensor x pipeline grid
is re-cut on load (any data-parallel size: the sampler state is global); ``python -m mpitrain
checkpoint consolidate`` turns one into the dense model's ``state_dict`` for any other use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from mpitrain.checkpoint.reshard import KIND
from mpitrain.checkpoint.shards import read_manifest, read_shard, save_shards
from mpitrain.errors import CheckpointError, MpitrainError, with_hint
from mpitrain.runtime.collective import agree
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI


class Grid(Protocol):
    """What this module reads of a process grid (``mpitrain.parallel.grid.Grid``)."""

    @property
    def comm(self) -> MPI.Intracomm: ...

    @property
    def tensor(self) -> int: ...

    @property
    def pipeline(self) -> int: ...

    @property
    def data(self) -> int: ...

    @property
    def tp_rank(self) -> int: ...

    @property
    def pp_rank(self) -> int: ...

    @property
    def dp_rank(self) -> int: ...


def save_parallel(
    grid: Grid, path: Path, step: int, payload: dict[str, Any],
    rules: dict[str, list[Any]], meta: dict[str, Any], *, run_id: str, virtual: int = 1,
) -> Path:
    """Collective (grid): write this step's grid state into the directory ``path``.

    Every rank passes its payload; only data-parallel index 0 writes. A failure on any
    writer raises the same CheckpointError on every rank of the grid. Which directories are
    kept is the trainer's checkpoint policy (``mpitrain.checkpoint``), not this module's.
    """
    from mpi4py import MPI

    position = grid.pp_rank * grid.tensor + grid.tp_rank
    writers = derived(grid.comm.Split(0 if grid.dp_rank == 0 else MPI.UNDEFINED, position))
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
            "grid": {"tensor": grid.tensor, "pipeline": grid.pipeline, "data": grid.data,
                     "virtual": virtual},
        }
        try:
            save_shards(path, payload, manifest, wcomm)
        except MpitrainError as exc:
            error = str(exc)
        wcomm.Free()
    errors = [e for e in grid.comm.allgather(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    return path


def load_parallel(
    grid: Grid, path: Path, meta: dict[str, Any] | None = None, *,
    rules: dict[str, list[Any]] | None = None, tied: dict[str, str] | None = None,
    virtual: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective (grid): return (this rank's payload, the manifest) of checkpoint ``path``.

    ``meta`` (the model's shape) must match the saved one: a different model is refused.
    Written on the same tensor x pipeline grid, this rank reads its own file; on another
    grid (given this stage's ``rules`` and its ``tied`` copies) every rank reads all files,
    joins them into the dense state and cuts its own slice of the parameters and of the
    optimizer state (any data-parallel size works either way: the replicas hold the same).
    """
    from mpitrain.checkpoint.reshard import consolidate_parallel, reshard
    from mpitrain.checkpoint.shards import read_shards

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
                          "resume --model gpt from a checkpoint of a grid run"))
        saved = doc["grid"]
        same = (saved["tensor"], saved["pipeline"], saved.get("virtual", 1))
        if same == (grid.tensor, grid.pipeline, virtual):
            entry = doc["files"][grid.pp_rank * grid.tensor + grid.tp_rank]
            return read_shard(path, entry), doc
        if rules is None:
            raise CheckpointError(with_hint(
                f"'{path}' was written by a grid of tensor {saved['tensor']} x pipeline "
                f"{saved['pipeline']} x {saved.get('virtual', 1)} chunks; this run is tensor "
                f"{grid.tensor} x pipeline {grid.pipeline} x {virtual}",
                "pass this stage's rules to re-cut it, or consolidate "
                "it: python -m mpitrain checkpoint consolidate DIR OUT.pt"))
        doc, payloads = read_shards(path)
        full = consolidate_parallel(doc, payloads)
        model, optim = reshard(full, rules, tied or {}, grid.tp_rank, grid.tensor)
        return {"model": model, "optim": optim, "resharded": dict(saved)}, doc

    return agree(grid.comm, read)
