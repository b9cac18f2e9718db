"""Atomic, collective checkpoints with checksums, a ``latest`` pointer and fallback on damage.

Checkpoints belong to a run. A run id (``20250301T101500Z-3fa9c2d1``: start time and random
hex) is made at a fresh start, kept across resumes, and written both into the checkpoint and
into its ``.sha256`` sidecar, as a comment line after the checksum (``sha256sum -c`` skips it)::

    <sha256>  step-000000012.pt
    # mpitrain run=20250301T101500Z-3fa9c2d1 step=12 saved=2025-03-01T10:17:03.120+00:00

A directory holds one run: :func:`plan_run` refuses a fresh run in a directory that holds
checkpoints, and a resumed run in one that holds another run's. Saving never overwrites and
pruning never deletes a file of another run. Checkpoints without a run id (format 1) are an
"unknown run": they load and resume, and are never pruned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import pickle
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.errors import CheckpointError, ConfigError, MpitrainError, with_hint
from mpitrain.runtime.files import write_atomic

if TYPE_CHECKING:
    from mpi4py import MPI

#: the checkpoint dict's ``format``: 2 adds ``run_id``, ``saved_at`` and ``step``
FORMAT = 2
_NAME = re.compile(r"^step-(\d{9})\.pt$")
_RUN_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
_META = "# mpitrain "
LATEST = "latest"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's name and sidecar say about it (no loading)."""

    path: Path
    step: int
    run_id: str | None  # None: format 1 or no readable sidecar, an unknown run
    saved_at: str | None  # ISO 8601 time of the save; None when unknown
    mtime: float  # the file's modification time (0 when it is gone)

    @property
    def when(self) -> str:
        """``saved <time>``, or ``file time <mtime>`` when the sidecar does not say."""
        if self.saved_at is not None:
            return f"saved {self.saved_at}"
        stamp = dt.datetime.fromtimestamp(self.mtime, dt.UTC).isoformat(timespec="seconds")
        return f"file time {stamp}"

    def order(self) -> tuple[float, int]:
        """Sort key: newer saves first when sorted in reverse (time, then step)."""
        if self.saved_at is not None:
            try:
                return dt.datetime.fromisoformat(self.saved_at).timestamp(), self.step
            except ValueError:
                pass
        return self.mtime, self.step

    def describe(self) -> str:
        """One line for messages: path, step, run and save time."""
        run = self.run_id or "unknown (no run id: format 1)"
        return f"'{self.path}' (step {self.step}, run {run}, {self.when})"


def new_run_id() -> str:
    """Return a fresh run id: the UTC start time and 8 random hex digits."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def now_iso() -> str:
    """Return the current UTC time as ISO 8601 with milliseconds (the ``saved_at`` format)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def checkpoint_path(directory: Path, step: int) -> Path:
    """Return the file name of the checkpoint taken after optimizer step ``step``."""
    return directory / f"step-{step:09d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def list_checkpoints(directory: Path) -> list[Path]:
    """Return checkpoint files in ``directory``, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_info(path: Path) -> CheckpointInfo:
    """Return what ``path``'s name and sidecar say (run id, save time); never raises."""
    match = _NAME.match(path.name)
    step = int(match.group(1)) if match else -1
    fields: dict[str, str] = {}
    try:
        lines = _sidecar(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith(_META):
            for word in line[len(_META) :].split():
                key, _, value = word.partition("=")
                fields[key] = value
    run_id = fields.get("run")
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return CheckpointInfo(
        path=path,
        step=step,
        run_id=run_id if run_id and _RUN_ID.match(run_id) else None,
        saved_at=fields.get("saved") or None,
        mtime=mtime,
    )


def checkpoint_infos(directory: Path) -> list[CheckpointInfo]:
    """Return every checkpoint in ``directory`` with its run, most recently saved first."""
    infos = [read_info(p) for p in list_checkpoints(directory)]
    return sorted(infos, key=CheckpointInfo.order, reverse=True)


def verify(path: Path) -> str | None:
    """Return None if ``path`` matches its ``.sha256`` sidecar, else the reason it does not."""
    sidecar = _sidecar(path)
    if not path.exists():
        return "file missing"
    if not sidecar.exists():
        return "checksum sidecar missing (interrupted save?)"
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    expected = text.split()[0] if text.strip() else ""
    return None if digest == expected else "checksum mismatch (truncated or modified)"


def save(
    state: dict[str, Any], directory: Path, step: int, keep_last: int, *, run_id: str
) -> Path:
    """Write ``state`` for ``step`` of run ``run_id`` atomically, its sidecar, ``latest``; prune.

    Pruning keeps the ``keep_last`` most recent saves of this run (the new one always) and never
    touches another run's files. Called on the writing rank only; see :func:`save_collective`.

    Raises:
        CheckpointError: when ``step``'s file belongs to another run (it is left as it is).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    if path.exists():
        owner = read_info(path).run_id
        if owner is not None and owner != run_id:
            raise CheckpointError(
                with_hint(
                    f"'{path}' belongs to run {owner}, not to this run {run_id}: not overwritten",
                    "give each run its own --checkpoint-dir",
                )
            )
    saved_at = str(state.get("saved_at") or now_iso())
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    write_atomic(path, data)
    meta = f"{_META}run={run_id} step={step} saved={saved_at} format={FORMAT}"
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(_sidecar(path), f"{digest}  {path.name}\n{meta}\n".encode())
    write_atomic(directory / LATEST, f"{path.name}\n".encode())
    mine = [i for i in checkpoint_infos(directory) if i.run_id == run_id and i.path != path]
    for old in mine[max(keep_last - 1, 0) :]:
        old.path.unlink(missing_ok=True)
        _sidecar(old.path).unlink(missing_ok=True)
    return path


def save_collective(
    comm: MPI.Intracomm,
    state: dict[str, Any] | None,
    directory: Path,
    step: int,
    keep_last: int,
    *,
    run_id: str,
) -> Path:
    """Collective: rank 0 writes ``state``; every rank returns its path or raises the same error."""
    error: str | None = None
    path = checkpoint_path(directory, step)
    if comm.rank == 0:
        assert state is not None
        try:
            path = save(state, directory, step, keep_last, run_id=run_id)
        except CheckpointError as exc:
            error = f"rank 0: {exc}"
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
    """Return the newest checkpoint that verifies, warning about each damaged newer one.

    The ``latest`` pointer is tried first, then the others from the most recent save back.
    """
    candidates = [i.path for i in checkpoint_infos(directory)]
    try:
        named = directory / (directory / LATEST).read_text("utf-8", errors="replace").strip()
    except OSError:  # no pointer (or not a readable file): the order of the saves decides
        named = None
    if named is not None and named in candidates:  # the newest complete save: try it first
        candidates.remove(named)
        candidates.insert(0, named)
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            sys.stderr.write(f"mpitrain: warning: skipping checkpoint '{path}': {problem}\n")
    return None


@dataclass(frozen=True)
class RunPlan:
    """How a run starts: its id, and the checkpoint it resumes from (None: from scratch)."""

    run_id: str
    resume_from: CheckpointInfo | None


def _runs(infos: list[CheckpointInfo]) -> str:
    """Name each run in ``infos`` (most recent first) with its newest checkpoint."""
    newest: dict[str | None, CheckpointInfo] = {}
    for info in infos:  # most recent save first
        newest.setdefault(info.run_id, info)
    parts = [
        f"{'run ' + run if run else 'a run without a run id (format 1)'} "
        f"(newest: step {i.step}, {i.when})"
        for run, i in newest.items()
    ]
    return " and ".join(parts)


def _writable_infos(directory: Path) -> list[CheckpointInfo]:
    """Create ``directory`` if needed, prove a file can be written there, list what it holds.

    Raises:
        ConfigError: it is not a directory, or not writable (found now, not at the first save).
    """
    hint = "give --checkpoint-dir a writable directory (on a filesystem every node shares)"
    if directory.exists() and not directory.is_dir():
        raise ConfigError(with_hint(f"--checkpoint-dir '{directory}' is not a directory", hint))
    probe = directory / f".mpitrain-probe-{secrets.token_hex(4)}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            with_hint(f"--checkpoint-dir '{directory}' is not writable: {exc}", hint)
        ) from None
    return checkpoint_infos(directory)


def decide_run(resume: str | None, directory: Path | None) -> RunPlan:
    """Decide the run id and the checkpoint to resume; refuse to mix runs in ``directory``.

    Serial (rank 0's half of :func:`plan_run`). ``resume`` is None (a fresh run), ``auto``
    (the newest good checkpoint in ``directory``, if any) or a checkpoint path.

    Raises:
        ConfigError: ``directory`` holds checkpoints of another run.
        CheckpointError: the checkpoint named by ``resume`` does not verify.
    """
    infos = _writable_infos(directory) if directory is not None else []
    if resume is None:
        if infos:
            raise ConfigError(
                with_hint(
                    f"--checkpoint-dir '{directory}' already holds checkpoints of {_runs(infos)}; "
                    "a new run there would mix with them",
                    "pass --resume auto to continue that run, or give this run a new "
                    "--checkpoint-dir (or delete the old step-*.pt files to start over)",
                )
            )
        return RunPlan(new_run_id(), None)
    choice: Path | None
    if resume == "auto":
        assert directory is not None
        choice, lineage = find_latest(directory), True
    else:
        choice = Path(resume)
        problem = "is a directory, not a checkpoint file" if choice.is_dir() else verify(choice)
        if problem is not None:
            raise CheckpointError(
                with_hint(
                    f"checkpoint '{choice}': {problem}",
                    "name a step-*.pt file, or use --resume auto with --checkpoint-dir to take "
                    "the newest good one",
                )
            )
        lineage = directory is not None and choice.resolve().parent == directory.resolve()
    info = read_info(choice) if choice is not None else None
    known = list(dict.fromkeys(i.run_id for i in infos if i.run_id is not None))
    if info is not None and info.run_id is not None:
        run_id = info.run_id
    elif lineage and len(known) == 1:
        run_id = known[0]  # continuing the directory's run (from a format-1 file, or afresh)
    else:
        run_id = new_run_id()
    # files without a run id count as this run's only when it continues from this directory
    others = [i for i in infos if i.run_id != run_id and (i.run_id is not None or not lineage)]
    if others:
        what = f"run {run_id} from {info.describe()}" if info else f"run {run_id}"
        raise ConfigError(
            with_hint(
                f"--checkpoint-dir '{directory}' holds checkpoints of {_runs(others)}; "
                f"resuming {what} there would mix runs",
                "keep one run per directory: move the other run's step-*.pt files away, or "
                "give this run a new --checkpoint-dir",
            )
        )
    return RunPlan(run_id, info)


def plan_run(comm: MPI.Intracomm, resume: str | None, directory: Path | None) -> RunPlan:
    """Collective: rank 0 decides how the run starts (:func:`decide_run`); all ranks agree.

    Every rank gets the same plan or raises the same error, so none waits for the others.
    """
    plan: RunPlan | None = None
    error: MpitrainError | None = None
    if comm.rank == 0:
        try:
            plan = decide_run(resume, directory)
        except MpitrainError as exc:
            error = exc
        except OSError as exc:  # a file that vanished or cannot be read while looking
            error = CheckpointError(
                with_hint(f"rank 0: cannot read checkpoints: {exc}", "check --checkpoint-dir")
            )
    error, plan = comm.bcast((error, plan), root=0)
    if error is not None:
        raise error
    assert plan is not None
    return plan


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


def load_of_run(info: CheckpointInfo, run_id: str) -> dict[str, Any]:
    """Load ``info``'s checkpoint to continue run ``run_id``; its run must match its sidecar's.

    Raises:
        CheckpointError: it cannot be loaded, or it names another run than its sidecar.
    """
    state = load(info.path)
    inside = state.get("run_id")
    if info.run_id is not None and inside not in (None, info.run_id):
        raise CheckpointError(
            with_hint(
                f"checkpoint '{info.path}' holds run {inside}, but its sidecar names run "
                f"{info.run_id}",
                "the sidecar was edited or copied from another file; restore it or resume "
                "from another checkpoint",
            )
        )
    if inside is not None and inside != run_id:  # a sidecar without the run line
        sys.stderr.write(
            f"mpitrain: warning: '{info.path}' holds run {inside}; continued as run {run_id}\n"
        )
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
