"""A per-rank memory budget enforced by the kernel (the cgroup memory controller).

``bench shard`` / ``bench parallel --memory-budget-mb M`` put every rank of every method into
its own cgroup with a limit of M MiB (cgroup v1 ``memory.limit_in_bytes`` or v2
``memory.max``): a method whose rank needs more is killed by the kernel's OOM killer, not by
our own accounting (:func:`oom_kills` reads the kernel's count). Root
only; the driver removes exactly the cgroups its workers created (named after its pid).
"""

from __future__ import annotations

import os
from pathlib import Path

from mpitrain.errors import ConfigError, with_hint

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
PREFIX = "mpitrain-budget-"


def _root() -> tuple[Path, str]:
    if (V1 / "memory.limit_in_bytes").exists():
        return V1, "memory.limit_in_bytes"
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return V2, "memory.max"
    raise ConfigError(with_hint("no cgroup memory controller here to enforce a memory budget",
                                "run without --memory-budget-mb"))


def cgroup_path(tag: str, rank: int) -> Path:
    """The cgroup of ``rank`` in the driver's run ``tag``."""
    return _root()[0] / f"{PREFIX}{tag}-{rank}"


def enter_budget(limit_bytes: int, tag: str, rank: int) -> Path:
    """Move this process into a new cgroup limited to ``limit_bytes``; return its path."""
    root, knob = _root()
    path = root / f"{PREFIX}{tag}-{rank}"
    try:
        path.mkdir(exist_ok=False)
        (path / knob).write_text(str(limit_bytes))
        if knob == "memory.limit_in_bytes" and (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))  # no swap out
        (path / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        raise ConfigError(with_hint(f"rank {rank}: cannot create cgroup '{path}': {exc}",
                                    "--memory-budget-mb needs root and a writable cgroup "
                                    "memory controller")) from exc
    return path


def remove_budgets(tag: str, ranks: int) -> None:
    """Remove the (now empty) cgroups of run ``tag``; only those, and only if they exist."""
    for rank in range(ranks):
        path = cgroup_path(tag, rank)
        if path.is_dir():
            try:
                path.rmdir()
            except OSError:
                pass  # a process still inside: the kernel keeps it; nothing else is touched


def peak_usage(path: Path) -> int | None:
    """The most bytes the cgroup at ``path`` has held (v1 ``memory.max_usage_in_bytes``,
    v2 ``memory.peak``), or None when the kernel does not say."""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        f = path / name
        if f.exists():
            return int(f.read_text().split()[0])
    return None


def oom_kills(path: Path) -> int:
    """How many processes the kernel's OOM killer has killed in the cgroup at ``path`` (v1
    ``memory.oom_control``, v2 ``memory.events``: their ``oom_kill`` line); 0 when it does
    not say or the cgroup is gone."""
    for name in ("memory.oom_control", "memory.events"):
        f = path / name
        if f.exists():
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0
