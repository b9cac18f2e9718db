"""The cluster's block of ``/etc/hosts``: added between marker lines, removed by `down`."""

from __future__ import annotations

import os
from pathlib import Path

from mpitrain.cluster import ClusterError
from mpitrain.runtime.tool_io import read_text

HOSTS = Path("/etc/hosts")
BEGIN = "# BEGIN mpitrain cluster (python -m mpitrain cluster up; removed by cluster down)"
END = "# END mpitrain cluster"


def _split(text: str) -> tuple[list[str], list[str] | None, list[str]]:
    """Return (lines before, lines of our block or None, lines after)."""
    lines = text.splitlines()
    if BEGIN not in lines:
        return lines, None, []
    start = lines.index(BEGIN)
    end = lines.index(END, start) if END in lines[start:] else len(lines) - 1
    return lines[:start], lines[start + 1 : end], lines[end + 1 :]


def _read(path: Path) -> str:
    """The hosts file's text; unreadable or not UTF-8 is a one-line ClusterError."""
    return read_text(path, "hosts file", error=ClusterError,
                     hint="fix or restore it (it must be UTF-8 text) and run the command again")


def _write(path: Path, lines: list[str]) -> None:
    """Write ``lines`` atomically; in place where the file cannot be replaced (bind mount)."""
    text = "".join(line + "\n" for line in lines)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    tmp = path.with_name(f".{path.name}.mpitrain.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError:
        # e.g. a container's bind-mounted /etc/hosts (EBUSY): rewrite the file itself
        if tmp.exists():
            tmp.unlink()
        with open(path, "w") as fh:
            fh.write(text)


def foreign(path: Path, names: list[str]) -> list[str]:
    """Lines outside our block that name any of ``names`` (someone else's entries)."""
    if not path.exists():
        return []
    before, _, after = _split(_read(path))
    wanted = set(names)
    return [ln for ln in before + after if wanted & set(ln.split("#")[0].split()[1:])]


def block(path: Path) -> list[str] | None:
    """Our block's lines, or None when the file has none."""
    return _split(_read(path))[1] if path.exists() else None


def write_block(path: Path, entries: list[tuple[str, str]]) -> None:
    """Put ``(address, name)`` entries between our markers (replacing an older block)."""
    before, _, after = _split(_read(path) if path.exists() else "")
    body = [f"{addr} {name}" for addr, name in entries]
    _write(path, [*before, BEGIN, *body, END, *after])


def remove_block(path: Path) -> bool:
    """Remove our block; True when there was one."""
    if not path.exists():
        return False
    before, ours, after = _split(_read(path))
    if ours is None:
        return False
    _write(path, before + after)
    return True
