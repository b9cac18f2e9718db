"""Lightning checkpoints under MPIStrategy: plain files for replicas, directories for ZeRO.

Replicas (``shard="none"``): Lightning's usual single file, written by rank 0 atomically
(temporary name, fsync, rename). ZeRO (``shard=...``): the path Lightning names (e.g.
``epoch=1-step=16.ckpt`` from ``ModelCheckpoint``, ``hpc_ckpt_1.ckpt`` on preemption) is a
directory::

    shard-00000-of-00004.pt ...  one per rank: its chunk of every parameter and optimizer
    manifest.json                state (mpitrain.grad.zero.save_sharded), then the manifest
    lightning.pt                 rank 0, last: the rest of Lightning's checkpoint (loops,
                                 callbacks, LR schedulers, hyper-parameters) and the
                                 manifest's SHA-256, so a mixed or unfinished save is refused

Either kind loads under either mode and any number of ranks: both are turned into the
consolidated form (``checkpoint.shards.consolidate``: full per-parameter tensors and optimizer
state by parameter name) where they differ. :func:`consolidate_checkpoint` writes a sharded
one as a plain Lightning checkpoint, which Lightning's own strategies load.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.checkpoint.shards import MANIFEST, load_full, read_manifest
from mpitrain.errors import CheckpointError, MpitrainError, with_hint
from mpitrain.grad.zero.state import load_consolidated
from mpitrain.grad.zero.wrapper import ShardedDataParallel
from mpitrain.runtime.collective import agree
from mpitrain.runtime.files import write_atomic, write_failure
from mpitrain.runtime.tool_io import read_bytes

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.grad.protocol import ExchangeBase

#: the file of a sharded checkpoint directory that holds Lightning's own state (written last)
META = "lightning.pt"
FORMAT = "mpitrain-lightning-sharded-1"
#: key of the in-memory checkpoint dict holding the consolidated state after a load
FULL = "_mpitrain_consolidated"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (not collective)."""
    return Path(path).is_dir()


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise CheckpointError(write_failure(path, exc, len(data))) from exc


def save_plain(checkpoint: dict[str, Any], path: Path, comm: MPI.Intracomm) -> None:
    """Collective: rank 0 writes ``checkpoint`` to ``path`` atomically; a failure raises the
    same CheckpointError on every rank."""
    def write() -> None:
        if comm.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, _to_bytes(checkpoint))

    agree(comm, write)


def save_sharded_checkpoint(
    checkpoint: dict[str, Any], path: Path, model: ShardedDataParallel,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Collective: write the directory described above (shards, manifest, then the rest)."""
    from mpitrain.grad.zero.state import save_sharded

    comm = model.comm

    def prepare() -> None:
        if comm.rank != 0:
            return
        if path.is_file():  # a plain checkpoint of the same name: replaced by a directory
            path.unlink()
        (path / META).unlink(missing_ok=True)  # the directory is unfinished until the end

    agree(comm, prepare)
    manifest = save_sharded(model, optimizer, path)
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}

    def finish() -> None:
        if comm.rank != 0:
            return
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        rest["mpitrain"] = {"format": FORMAT, "manifest_sha256": digest, "ranks": comm.size,
                            "stage": model.stage}
        _write(path / META, _to_bytes(rest))

    agree(comm, finish)


def read_sharded(path: Path, load: Any) -> dict[str, Any]:
    """Read a sharded checkpoint directory (every file verified); not collective.

    ``load(file)`` reads ``lightning.pt`` (the strategy passes its CheckpointIO). Returns
    Lightning's checkpoint dict with ``state_dict`` the consolidated model and the
    consolidated state under :data:`FULL`.
    """
    meta_path = path / META
    if not meta_path.exists():
        raise CheckpointError(with_hint(
            f"'{meta_path}' does not exist: '{path}' is not a finished sharded checkpoint",
            "resume from another checkpoint; lightning.pt is written last, so this save did "
            "not complete"))
    meta: dict[str, Any] = load(meta_path)
    info = meta.get("mpitrain") if isinstance(meta, dict) else None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(with_hint(f"'{meta_path}' is not an MPIStrategy checkpoint",
                                        "pass the directory MPIStrategy(shard=...) wrote"))
    manifest = read_bytes(path / MANIFEST, "checkpoint manifest", error=CheckpointError,
                          hint="resume from another checkpoint")
    if hashlib.sha256(manifest).hexdigest() != info.get("manifest_sha256"):
        raise CheckpointError(with_hint(
            f"'{path / MANIFEST}' is not the manifest '{meta_path}' was saved with (the "
            "directory mixes two saves)", "resume from another checkpoint"))
    full = load_full(path)
    full["names"] = parameter_names(path, full)
    meta["state_dict"] = full["model"]
    meta["optimizer_states"] = [None]  # held by FULL (Lightning checks the key exists)
    meta[FULL] = full
    return meta


def parameter_names(path: Path, full: dict[str, Any]) -> list[str]:
    """The trainable parameters of a sharded checkpoint, in the module's registration order
    (the order an optimizer over ``module.parameters()`` holds them)."""
    params = {str(p[0]) for p in read_manifest(path)["layout"]["params"]}
    return [k for k in full["model"] if k in params]


def reader(io_plugin: Any, weights_only: bool | None) -> Callable[[Path], dict[str, Any]]:
    """``load(path)`` through Lightning's CheckpointIO; any failure is one CheckpointError
    line naming the file (so :func:`load_any` can agree on it)."""
    def load(path: Path) -> dict[str, Any]:
        try:
            out: dict[str, Any] = io_plugin.load_checkpoint(path, weights_only=weights_only)
        except MpitrainError:
            raise
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(with_hint(f"cannot load checkpoint '{path}': {reason}",
                                            "check ckpt_path")) from None
        return out

    return load


def load_any(path: str | Path, comm: MPI.Intracomm, load: Any) -> dict[str, Any]:
    """Collective: read a plain or sharded checkpoint on every rank; a failure on any rank
    raises the lowest failing rank's CheckpointError on all of them."""
    def read() -> dict[str, Any]:
        p = Path(path)
        if p.is_dir():
            return read_sharded(p, load)
        if not p.exists():
            raise CheckpointError(with_hint(f"checkpoint '{p}' does not exist",
                                            "check ckpt_path (and that every node sees it)"))
        out: dict[str, Any] = load(p)
        return out

    kinds = comm.allgather(Path(path).is_dir())
    if len(set(kinds)) > 1:
        raise CheckpointError(with_hint(
            f"checkpoint '{path}' is a directory on ranks "
            f"{[r for r, k in enumerate(kinds) if k]} only",
            "put checkpoints on a file system every node sees alike"))
    return agree(comm, read)


def consolidated(checkpoint: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Return the consolidated state of ``checkpoint`` (sharded: as read; plain: built from
    Lightning's ``state_dict`` and first optimizer state, whose parameters are ``names``)."""
    if FULL in checkpoint:
        full: dict[str, Any] = checkpoint[FULL]
        return full
    optim: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = [{}]
    states = checkpoint.get("optimizer_states") or []
    if states and states[0]:
        saved = states[0]
        if len(saved["param_groups"]) != 1:
            raise CheckpointError(with_hint(
                f"the checkpoint's optimizer has {len(saved['param_groups'])} param groups; a "
                "sharded optimizer has one", "resume it with shard='none'"))
        groups = saved["param_groups"]
        order = groups[0]["params"]
        for idx, st in saved["state"].items():
            optim[names[order.index(idx)]] = st
    return {"model": checkpoint["state_dict"], "optim_state": optim, "param_groups": groups,
            "names": names}


def optimizer_state_for(full: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An unsharded optimizer's ``state_dict`` over ``names`` (one group) from ``full``."""
    from mpitrain.checkpoint.shards import optimizer_state_dict

    return optimizer_state_dict(full, names)


def trainable_names(module: torch.nn.Module) -> list[str]:
    """The module's trainable parameters in registration order (an optimizer's order)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def load_module_state(exchange: ExchangeBase | None, module: torch.nn.Module,
                      checkpoint: Any, *, strict: bool) -> bool:
    """Load the module's state from ``checkpoint`` where it needs more than Lightning does:
    into ZeRO shards (from either kind), or a sharded checkpoint into a plain module.

    Returns False when Lightning's own loading applies (a plain checkpoint, no ZeRO).
    """
    if isinstance(exchange, ShardedDataParallel):
        load_consolidated(exchange, None,
                          consolidated(dict(checkpoint), trainable_names(module)))
        return True
    if FULL in checkpoint:
        module.load_state_dict(checkpoint[FULL]["model"], strict=strict)
        return True
    return False


def load_optimizer_state(exchange: ExchangeBase | None, module: torch.nn.Module,
                         optimizers: list[torch.optim.Optimizer], checkpoint: Any) -> bool:
    """Load the optimizer's state as :func:`load_module_state` loads the module's.

    Raises:
        CheckpointError: a sharded checkpoint into optimizers that are not one optimizer over
            all trainable parameters in the module's order (one line, with the fix).
    """
    names = trainable_names(module)
    if isinstance(exchange, ShardedDataParallel):
        load_consolidated(exchange, optimizers[0], consolidated(dict(checkpoint), names))
        return True
    if FULL not in checkpoint:
        return False
    by_name = dict(module.named_parameters())
    opt = optimizers[0] if len(optimizers) == 1 else None
    if opt is None or len(opt.param_groups) != 1 or [
            id(p) for p in opt.param_groups[0]["params"]] != [id(by_name[n]) for n in names]:
        raise CheckpointError(with_hint(
            "a sharded checkpoint restores one optimizer over all trainable parameters (one "
            "param group, the module's order)", "build it as torch.optim.X(self.parameters(), "
            "...), or resume with the shard= mode that saved it"))
    opt.load_state_dict(optimizer_state_for(checkpoint[FULL], names))
    return True


def consolidate_checkpoint(directory: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the sharded checkpoint ``directory`` as one plain Lightning checkpoint ``out``
    (any strategy, ``torch.load``, ``LightningModule.load_from_checkpoint``); returns it.

    Not collective: run it in one process.
    """
    meta = read_sharded(Path(directory), lambda p: torch.load(p, map_location="cpu",
                                                              weights_only=False))
    full = meta.pop(FULL)
    meta.pop("mpitrain", None)
    names = full["names"]
    meta["state_dict"] = full["model"]
    meta["optimizer_states"] = [optimizer_state_for(full, names)]
    _write(Path(out), _to_bytes(meta))
    return meta
