"""ZeRO's state in the trainer's checkpoints: a shard directory beside the checkpoint file.

A ``--shard`` run's checkpoint of step S is ``ckpt-step-S-RUN.shards/`` (:func:`save_sharded`:
one file per rank with a checksum, manifest written last: parameters and this rank's optimizer
state) and then the loop's checkpoint file, whose ``model`` entry names that directory and its
manifest's SHA-256 (:mod:`mpitrain.checkpoint.payload`, kind ``sharded``). Resuming on M != N
ranks re-shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.checkpoint.payload import dir_name
from mpitrain.checkpoint.shards import MANIFEST
from mpitrain.errors import CheckpointError, with_hint
from mpitrain.grad.zero.state import load_sharded, save_sharded
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    import torch

    from mpitrain.grad.zero.wrapper import ShardedDataParallel


class ShardedState:
    """``sharded``: each rank writes its shards; the file keeps the directory's name."""

    kind = "sharded"

    def __init__(self, model: ShardedDataParallel, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def holds(self) -> dict[str, list[int]]:
        """The full (unsharded) parameter shapes and the module's other tensors."""
        from mpitrain.checkpoint.compat import tensor_shapes

        slots = {s.name: s.shape for s in self.model.layout.slots}
        pairs = [(s.name, s.shape) for s in self.model.layout.slots] + [
            (k, v) for k, v in self.model.module.state_dict().items() if k not in slots]
        return {k: list(v) for k, v in tensor_shapes(pairs).items()}

    def save(self, directory: Path | None, step: int, run_id: str | None) -> tuple[Any, Any]:
        """Collective: write the shards; the file's ``model`` entry references them."""
        assert directory is not None and run_id is not None
        name = dir_name(step, run_id, self.kind)
        manifest = save_sharded(self.model, self.optimizer, Path(directory) / name)
        comm = self.model.comm
        sha = agree(comm, lambda: hashlib.sha256(manifest.read_bytes()).hexdigest()
                    if comm.rank == 0 else "")
        return {"sharded": name, "manifest_sha256": comm.bcast(sha, root=0),
                "stage": self.model.stage}, None

    def load(self, state: dict[str, Any], origin: Path | None) -> None:
        """Collective: load the shards the file names (written on any number of ranks)."""
        assert origin is not None
        ref = state["model"]
        path = Path(origin) / str(ref["sharded"])

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

        agree(self.model.comm, check)
        load_sharded(self.model, self.optimizer, path)
