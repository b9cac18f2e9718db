"""The model and optimizer state of a checkpoint: one protocol, three kinds, one policy.

The trainer's checkpoint file (:mod:`mpitrain.checkpoint.files`) holds the loop's state and
two entries, ``model`` and ``optimizer``, that the run's exchange fills: every exchange hands
the checkpointer a :class:`StateIO` (``Exchange.checkpoint_state(optimizer)``), so the
checkpointer never asks which wrapper class it holds. The kinds (:data:`KINDS`):

- ``plain``: replicated state (sync and asynchronous data parallelism): the two state dicts,
  in the file itself (:class:`ReplicatedState`);
- ``sharded``: ZeRO's shards, a directory ``ckpt-step-S-RUN.shards`` beside the file
  (``mpitrain.grad.zero.checkpoint``), ``model`` holds its name and manifest SHA-256;
- ``grid``: a tensor x pipeline grid's slices, ``ckpt-step-S-RUN.grid``
  (:mod:`mpitrain.checkpoint.grid`; written by ``mpitrain.train.grid_state``).

A directory is written completely before the file that names it, so a checkpoint file that
exists has its state. :func:`prune_directories` removes this run's directories whose file is
gone (after the files' own pruning), nothing else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mpitrain.checkpoint import compat
from mpitrain.errors import CheckpointError, with_hint

if TYPE_CHECKING:
    import torch


class StateIO(Protocol):
    """How one run's model and optimizer state goes into, and comes out of, a checkpoint."""

    kind: str  #: a key of :data:`KINDS`

    def holds(self) -> dict[str, list[int]]:
        """Tensor name -> shape as in the unwrapped model ({}: compared when loaded). Local."""
        ...

    def save(self, directory: Path | None, step: int, run_id: str | None) -> tuple[Any, Any]:
        """Collective: write what lives beside the file (:func:`dir_name` in ``directory``);
        return the file's ``model`` and ``optimizer`` entries (rank 0's are kept)."""
        ...

    def load(self, state: dict[str, Any], origin: Path | None) -> None:
        """Collective: restore the ``model``/``optimizer`` entries of ``state``, read from the
        directory ``origin`` (called after :func:`check_holds`)."""
        ...


@dataclass(frozen=True)
class Kind:
    """One registered kind of checkpointed state."""

    name: str
    suffix: str | None  #: the directory beside the file (None: all in the file)
    marker: str | None  #: the key of the ``model`` entry that names it (None: a state dict)
    saved: str  #: "'X' was saved ..." in a refusal
    now: str  #: "... and this run ..." in a refusal


#: kind name -> how it is stored and described
KINDS: dict[str, Kind] = {
    "plain": Kind("plain", None, None, "without --shard", "is not sharded"),
    "sharded": Kind("sharded", ".shards", "sharded", "with --shard {shard}", "is sharded"),
    "grid": Kind("grid", ".grid", "grid_dir", "by a tensor/pipeline grid",
                 "runs a tensor/pipeline grid"),
}


def saved_kind(ref: Any) -> Kind:
    """The kind of a checkpoint file's ``model`` entry."""
    if isinstance(ref, dict):
        for kind in KINDS.values():
            if kind.marker is not None and kind.marker in ref:
                return kind
    return KINDS["plain"]


def dir_name(step: int, run_id: str, kind: str) -> str:
    """The directory of ``kind``'s state of step ``step`` of run ``run_id``."""
    suffix = KINDS[kind].suffix
    assert suffix is not None, kind
    return f"ckpt-step-{step:08d}-{run_id}{suffix}"


class ReplicatedState:
    """``plain``: every rank holds the same model and optimizer; rank 0's state dicts go
    into the file."""

    kind = "plain"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = module
        self.optimizer = optimizer

    def holds(self) -> dict[str, list[int]]:
        """The module's tensors and their shapes."""
        return _shapes(self.module.state_dict().items())

    def save(self, directory: Path | None, step: int, run_id: str | None) -> tuple[Any, Any]:
        """The two state dicts (no communication)."""
        del directory, step, run_id
        return self.module.state_dict(), self.optimizer.state_dict()

    def load(self, state: dict[str, Any], origin: Path | None) -> None:
        """Load the two state dicts (no communication)."""
        del origin
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _shapes(pairs: Any) -> dict[str, list[int]]:
    return {k: list(v) for k, v in compat.tensor_shapes(pairs).items()}


def weights_state(io: StateIO, directory: Path | None, step: int,
                  run_id: str | None) -> tuple[Any, Any]:
    """Collective: the checkpoint file's ``model`` and ``optimizer`` entries."""
    return io.save(directory, step, run_id)


def run_holds(io: StateIO, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What this run holds (JSON-ready), saved in every checkpoint file. Local."""
    kind, _groups, _keys = compat.of_optimizer(optimizer)
    return {"tensors": io.holds(), "optimizer": kind}


def check_holds(io: StateIO, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                what: str, now_config: dict[str, Any]) -> None:
    """Refuse (one line) a checkpoint ``state`` of another kind, model or optimizer.

    Not collective: every rank reads the same file and decides alike. Checkpoints written
    before ``holds`` was recorded are described from their state dicts.
    """
    saved, now = saved_kind(state["model"]), KINDS[io.kind]
    if saved.name != now.name:
        config = state.get("config") or {}
        said = saved.saved.format(shard=config.get("shard", "?"))
        raise CheckpointError(with_hint(
            f"'{what}' was saved {said} and this run {now.now}",
            "resume with the options it was saved with (any ZeRO stage of a sharded one), "
            "or consolidate it: python -m mpitrain checkpoint consolidate DIR OUT.pt"))
    saved_holds = state.get("holds") or {}
    tensors = saved_holds.get("tensors")
    plain = saved.suffix is None
    if tensors is None and plain:
        tensors = compat.tensor_shapes(state["model"].items())
    kind, groups, _keys = compat.of_optimizer(optimizer)
    saved_groups = None
    if plain and isinstance(state.get("optimizer"), dict):
        saved_groups, _ = compat.optimizer_holds(state["optimizer"])
    compat.check(
        what,
        compat.Holds(tensors=compat.tensor_shapes((tensors or {}).items()),
                     optimizer=saved_holds.get("optimizer"), groups=saved_groups),
        compat.Holds(tensors=compat.tensor_shapes(io.holds().items()) if tensors else {},
                     optimizer=kind, groups=groups if saved_groups is not None else None),
        saved_config=state.get("config"), now_config=now_config)


def prune_directories(directory: Path, run_id: str, kept_steps: set[int]) -> None:
    """Remove this run's state directories of steps not in ``kept_steps`` (rank 0)."""
    for kind in KINDS.values():
        if kind.suffix is None:
            continue
        kept = {dir_name(s, run_id, kind.name) for s in kept_steps}
        for path in Path(directory).glob(f"ckpt-step-*-{run_id}{kind.suffix}"):
            if path.name not in kept and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
