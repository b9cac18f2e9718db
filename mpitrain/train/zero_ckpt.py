"""The trainer's checkpoints of a ZeRO model: sharded state beside the loop's checkpoint file.

A ``--shard`` run's checkpoint of step S is two things in ``--checkpoint-dir``:
``ckpt-step-S-RUN.shards/`` (:func:`mpitrain.grad.zero.state.save_sharded`: one file per rank
with a checksum, manifest written last: parameters and this rank's optimizer state) and then
the usual checkpoint file (rank 0: loop, sampler, scheduler, RNG...), whose ``model`` entry
names that directory and its manifest's SHA-256. The file is written after the directory is
complete, so a checkpoint file that exists has its shards; resuming on M != N ranks re-shards.
Pruning removes this run's shard directories whose checkpoint file is gone, nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain import checkpoint_compat as compat
from mpitrain.checkpoint_shards import MANIFEST
from mpitrain.errors import CheckpointError, with_hint
from mpitrain.grad.zero.state import load_sharded, save_sharded
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    import torch

    from mpitrain.grad.zero.wrapper import ShardedDataParallel

SUFFIX = ".shards"
#: a model-parallel grid's state beside its checkpoint file (``mpitrain.parallel.checkpoint``)
GRID_SUFFIX = ".grid"


def shard_dir_name(step: int, run_id: str, suffix: str = SUFFIX) -> str:
    """The shard (or grid) directory of step ``step`` of run ``run_id``."""
    return f"ckpt-step-{step:08d}-{run_id}{suffix}"


def save_trainer_shards(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer, directory: Path, step: int,
    run_id: str,
) -> dict[str, Any]:
    """Collective: write the shards of ``step``; return the reference the checkpoint keeps."""
    name = shard_dir_name(step, run_id)
    manifest = save_sharded(model, optimizer, Path(directory) / name)
    sha = agree(model.comm, lambda: hashlib.sha256(manifest.read_bytes()).hexdigest()
                if model.comm.rank == 0 else "")
    return {"sharded": name, "manifest_sha256": model.comm.bcast(sha, root=0),
            "stage": model.stage}


def load_trainer_shards(
    model: ShardedDataParallel, optimizer: torch.optim.Optimizer, directory: Path,
    ref: dict[str, Any],
) -> None:
    """Collective: load the shards a checkpoint file names (written on any number of ranks)."""
    path = Path(directory) / str(ref["sharded"])

    def check() -> None:
        try:
            sha = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
        except OSError as exc:
            raise CheckpointError(with_hint(
                f"the checkpoint's shards '{path}' cannot be read: {exc}",
                "the shard directory must stay beside its checkpoint file")) from exc
        if sha != ref["manifest_sha256"]:
            raise CheckpointError(with_hint(
                f"'{path / MANIFEST}' is not the manifest its checkpoint file names",
                "resume from another checkpoint (--resume PATH)"))

    agree(model.comm, check)
    load_sharded(model, optimizer, path)


def prune_trainer_shards(directory: Path, run_id: str) -> None:
    """Remove this run's shard directories whose checkpoint file is gone (rank 0, after save)."""
    from mpitrain.checkpoint import checkpoint_infos

    steps = [i.step for i in checkpoint_infos(Path(directory)) if i.run_id == run_id]
    for suffix in (SUFFIX, GRID_SUFFIX):
        kept = {shard_dir_name(s, run_id, suffix) for s in steps}
        for path in Path(directory).glob(f"ckpt-step-*-{run_id}{suffix}"):
            if path.name not in kept and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def weights_state(
    model: Any, optimizer: torch.optim.Optimizer, directory: Path | None, step: int,
    run_id: str | None,
) -> tuple[Any, Any]:
    """Collective: the checkpoint's ``model`` and ``optimizer`` entries.

    Replicated models: their state dicts (rank 0's are written). ZeRO and model-parallel
    grids: the shards are written now, and ``model`` holds their reference (``optimizer``
    None).
    """
    kind = _kind(model)
    if kind == "plain":
        return model.module.state_dict(), optimizer.state_dict()
    assert directory is not None and run_id is not None
    save = save_grid if kind == "grid" else save_trainer_shards
    return save(model, optimizer, directory, step, run_id), None


def save_grid(model: Any, optimizer: torch.optim.Optimizer, directory: Path, step: int,
              run_id: str) -> dict[str, Any]:
    """Collective: write a grid's state of ``step``; return the reference the file keeps."""
    from mpitrain.parallel.checkpoint import save_parallel

    name = shard_dir_name(step, run_id, GRID_SUFFIX)
    payload = model.checkpoint_payload(optimizer)  # ZeRO: joined over the replicas
    save_parallel(model.grid, Path(directory) / name, step, payload, model.rules, model.meta,
                  run_id=run_id)
    g = model.grid
    return {"grid_dir": name, "meta": model.meta,
            "grid": {"tensor": g.tensor, "pipeline": g.pipeline, "data": g.data}}


def load_grid(model: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Collective: load this rank's (stage, tensor slice) of a grid's state from ``path``.

    The model's shape must match (refused with a hint); a state written on another tensor x
    pipeline grid is re-cut for this one (``checkpoint_parallel.reshard``). Each rank's
    tensors and optimizer are compared before anything is loaded.
    """
    from mpitrain.parallel.checkpoint import load_parallel

    mine, doc = load_parallel(model.grid, path, model.meta, rules=model.rules,
                              tied=model.module.tied_names())

    def check() -> None:
        _kind, groups, _keys = compat.of_optimizer(optimizer)
        if model.sharded is not None:  # the optimizer steps shards: count the parameters
            groups = tuple((keys, len(model.rules)) for keys, _n in groups)
        compat.check(
            str(path),
            compat.Holds(tensors=compat.tensor_shapes(mine["model"].items()),
                         groups=compat.optimizer_holds(mine["optim"])[0]),
            compat.Holds(tensors=compat.tensor_shapes(model.module.state_dict().items()),
                         groups=groups),
            saved_config=doc.get("meta"), now_config=model.meta)

    agree(model.grid.comm, check)
    model.load_payload(optimizer, mine)


def _kind(model: Any) -> str:
    from mpitrain.grad.zero.wrapper import ShardedDataParallel
    from mpitrain.train.grid import GridExchange

    if isinstance(model, GridExchange):
        return "grid"
    return "sharded" if isinstance(model, ShardedDataParallel) else "plain"


def _saved_kind(ref: Any) -> str:
    if isinstance(ref, dict) and "grid_dir" in ref:
        return "grid"
    return "sharded" if isinstance(ref, dict) and "sharded" in ref else "plain"


def run_holds(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What this run's model and optimizer hold (JSON-ready), saved in every checkpoint file.

    Not collective. Tensors are named and shaped as in the unwrapped model (a ZeRO model's
    full parameter shapes, not its shards).
    """
    kind, _groups, _keys = compat.of_optimizer(optimizer)
    wrapper = _kind(model)
    if wrapper == "grid":  # each rank's part is compared when it is loaded
        return {"tensors": {}, "optimizer": kind}
    if wrapper == "sharded":
        slots = {s.name: s.shape for s in model.layout.slots}
        pairs = [(s.name, s.shape) for s in model.layout.slots] + [
            (k, v) for k, v in model.module.state_dict().items() if k not in slots]
    else:
        pairs = list(model.module.state_dict().items())
    return {"tensors": {k: list(v) for k, v in compat.tensor_shapes(pairs).items()},
            "optimizer": kind}


def check_holds(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                what: str, now_config: dict[str, Any]) -> None:
    """Refuse (one line) a checkpoint ``state`` that holds another model or optimizer.

    Not collective: every rank reads the same file and decides alike. Checkpoints written
    before ``holds`` was recorded are described from their state dicts.
    """
    saved_holds = state.get("holds") or {}
    ref = state["model"]
    saved_kind, now_kind = _saved_kind(ref), _kind(model)
    sharded = saved_kind != "plain"
    if saved_kind != now_kind:
        config = state.get("config") or {}
        said = {"plain": "without --shard", "grid": "by a tensor/pipeline grid",
                "sharded": f"with --shard {config.get('shard', '?')}"}
        now = {"plain": "is not sharded", "grid": "runs a tensor/pipeline grid",
               "sharded": "is sharded"}
        raise CheckpointError(with_hint(
            f"'{what}' was saved {said[saved_kind]} and this run {now[now_kind]}",
            "resume with the options it was saved with (any ZeRO stage of a sharded one), "
            "or consolidate it: python -m mpitrain checkpoint consolidate DIR OUT.pt"))
    tensors = saved_holds.get("tensors")
    if tensors is None and not sharded:
        tensors = compat.tensor_shapes(ref.items())
    now_tensors: dict[str, list[int]] = run_holds(model, optimizer)["tensors"]
    kind, groups, _keys = compat.of_optimizer(optimizer)
    saved_groups = None
    if not sharded and isinstance(state.get("optimizer"), dict):
        saved_groups, _ = compat.optimizer_holds(state["optimizer"])
    compat.check(
        what,
        compat.Holds(tensors=compat.tensor_shapes((tensors or {}).items()),
                     optimizer=saved_holds.get("optimizer"), groups=saved_groups),
        compat.Holds(tensors=compat.tensor_shapes(now_tensors.items()) if tensors else {},
                     optimizer=kind, groups=groups if saved_groups is not None else None),
        saved_config=state.get("config"), now_config=now_config)


def load_weights(
    model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], origin: Path | None
) -> None:
    """Collective for ZeRO: restore the ``model``/``optimizer`` entries of a checkpoint.

    Call :func:`check_holds` first (it refuses a checkpoint of another kind or shape).
    """
    ref = state["model"]
    kind = _saved_kind(ref)
    if kind == "grid":
        assert origin is not None
        load_grid(model, optimizer, Path(origin) / str(ref["grid_dir"]))
        return
    if kind == "plain":
        model.module.load_state_dict(ref)
        optimizer.load_state_dict(state["optimizer"])
        return
    assert origin is not None
    load_trainer_shards(model, optimizer, origin, ref)
