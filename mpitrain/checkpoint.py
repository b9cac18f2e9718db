"""Atomic, collective checkpoints with checksums, a ``latest`` pointer and fallback on damage."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.errors import CheckpointError, with_hint
from mpitrain.runtime.files import write_atomic

if TYPE_CHECKING:
    from mpi4py import MPI

_NAME = re.compile(r"^step-(\d{9})\.pt$")
LATEST = "latest"


def checkpoint_path(directory: Path, step: int) -> Path:
    """Return the file name of the checkpoint taken after optimizer step ``step``."""
    return directory / f"step-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Return checkpoint files in ``directory``, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def verify(path: Path) -> str | None:
    """Return None if ``path`` matches its ``.sha256`` sidecar, else the reason it does not."""
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists():
        return "file missing"
    if not sidecar.exists():
        return "checksum sidecar missing (interrupted save?)"
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return None if digest == expected else "checksum mismatch (truncated or modified)"


def save(state: dict[str, Any], directory: Path, step: int, keep_last: int) -> Path:
    """Write ``state`` for ``step`` atomically, then its checksum, then ``latest``; prune old.

    Called on the writing rank only; see :func:`save_collective` for the collective wrapper.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = checkpoint_path(directory, step)
    write_atomic(path, data)
    write_atomic(
        path.with_name(path.name + ".sha256"),
        f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode(),
    )
    write_atomic(directory / LATEST, f"{path.name}\n".encode())
    for old in list_checkpoints(directory)[keep_last:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def save_collective(
    comm: MPI.Intracomm, state: dict[str, Any] | None, directory: Path, step: int, keep_last: int
) -> Path:
    """Collective: rank 0 writes ``state``; every rank returns its path or raises the same error."""
    error: str | None = None
    path = checkpoint_path(directory, step)
    if comm.rank == 0:
        assert state is not None
        try:
            path = save(state, directory, step, keep_last)
        except OSError as exc:
            error = with_hint(
                f"rank 0: cannot write checkpoint '{path}': {exc}",
                "check --checkpoint-dir is writable and has space",
            )
    error = comm.bcast(error, root=0)
    if error is not None:
        raise CheckpointError(error)
    return path


def find_latest(directory: Path, warn: bool = True) -> Path | None:
    """Return the newest checkpoint that verifies, warning about each damaged newer one."""
    candidates = list_checkpoints(directory)
    pointer = directory / LATEST
    if pointer.exists():
        named = directory / pointer.read_text().strip()
        if named in candidates:  # the pointer names the newest complete save; try it first
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            sys.stderr.write(f"mpitrain: warning: skipping checkpoint '{path}': {problem}\n")
    return None


def resolve_resume(comm: MPI.Intracomm, resume: str, directory: Path | None) -> Path | None:
    """Collective: rank 0 picks the checkpoint to resume from; all ranks get the same answer.

    ``resume`` is ``auto`` (latest complete one in ``directory``, or None to start fresh) or a path.
    """
    choice: Path | None = None
    error: str | None = None
    if comm.rank == 0:
        if resume == "auto":
            assert directory is not None
            choice = find_latest(directory)
        else:
            choice = Path(resume)
            problem = verify(choice)
            if problem is not None:
                error = with_hint(
                    f"checkpoint '{choice}': {problem}",
                    "use --resume auto to fall back to the newest good one",
                )
    error, choice = comm.bcast((error, choice), root=0)
    if error is not None:
        raise CheckpointError(error)
    return choice


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            with_hint(
                f"cannot load checkpoint '{path}': {exc}", "try an older one in the directory"
            )
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' does not hold a dict")
    return state


def state_digest(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Return a SHA-256 over parameters, buffers and optimizer tensors (for cross-rank checks)."""
    h = hashlib.sha256()
    for name, t in list(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for pid, pstate in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(pstate.items()):
            h.update(f"{pid}.{key}".encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def check_same_everywhere(comm: MPI.Intracomm, digest: str, what: str) -> None:
    """Collective: raise the same CheckpointError on every rank unless all digests agree."""
    digests = comm.allgather(digest)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise CheckpointError(
            with_hint(
                f"after {what}, ranks {bad} hold different state than rank 0",
                "the checkpoint directory may differ between nodes; use a shared filesystem",
            )
        )
