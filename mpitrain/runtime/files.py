"""Atomic files and directories: unique temporary names, fsync, rename, fsync the directory.

Nothing here leaves a temporary behind: a failed write removes its temporary file, and a
directory is published by one rename that refuses to replace anything it was not told to.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: the names :func:`temporary_name` and :func:`make_temp_dir` produce (hidden, pid, random)
_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-z_]{8,}\.(tmp|old)$")

#: the longest plain name (a prefix: shard and split names add a few characters)
MAX_NAME = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: what identifies one directory on disk: (device, inode) of it and (inode, mtime, size) of a
#: marker file in it; a directory renamed away and back keeps it, a re-created one does not
DirIdentity = tuple[int, ...]


class PublishConflict(FileExistsError):
    """Another writer published at the target (or replaced it) while this one was writing."""


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a plain file-name part (None when it is one).

    Plain: a non-empty string without path separators, control characters, a leading dot
    (hidden names are kept for temporaries) or surrounding blanks, at most MAX_NAME long.
    """
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if value in (".", ".."):
        return "names a directory"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if _CONTROL.search(value):
        return "contains a control character"
    if value.startswith("."):
        return "starts with '.' (hidden names are kept for temporary files)"
    if value != value.strip():
        return "has leading or trailing blanks"
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    return None


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Return a hidden temporary name beside ``path``, unique per call (pid + random)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one this module makes for temporaries (or a directory being swapped)."""
    return _TEMPORARY.match(name) is not None


def remove_path(path: Path) -> None:
    """Remove a file or directory tree if it exists (never follows a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def temporary_path(path: Path) -> Iterator[Path]:
    """Yield a unique temporary name beside ``path`` for the body to write (bytes, HDF5, ...).

    On success the file is fsynced and renamed to ``path`` and the directory fsynced; on any
    failure (including KeyboardInterrupt) the temporary is removed and the error re-raised.
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        remove_path(tmp)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary name, fsync, then rename.

    Raises:
        OSError: as the write raised it (ENOSPC, EACCES ...); no temporary file is left.
    """
    with temporary_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def space_note(path: Path, needed: int | None) -> str:
    """Return ``needs N bytes, M bytes free in 'DIR'`` for a write of ``needed`` bytes."""
    free = free_bytes(path.parent)
    parts = [] if needed is None else [f"needs {needed} bytes"]
    if free is not None:
        parts.append(f"{free} bytes free in '{path.parent}'")
    return ", ".join(parts) or "free space unknown"


def write_failure(path: Path, exc: OSError, needed: int | None) -> str:
    """Describe a failed write of ``path`` in one line: the file, the reason, the space."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
    return f"cannot write '{path}': {reason} ({space_note(path, needed)})".replace("\n", " ")


def make_temp_dir(target: Path) -> Path:
    """Create and return a new hidden directory beside ``target`` (unique: pid + random)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    )


def dir_identity(path: Path, marker: str) -> DirIdentity:
    """Return what identifies directory ``path`` (and its ``marker`` file) right now."""
    d = os.stat(path, follow_symlinks=False)
    try:
        m = os.stat(path / marker, follow_symlinks=False)
        mark: tuple[int, ...] = (m.st_ino, m.st_mtime_ns, m.st_size)
    except FileNotFoundError:
        mark = ()
    return (d.st_dev, d.st_ino, *mark)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def publish_dir(tmp: Path, out: Path, *, replace: DirIdentity | None, marker: str) -> None:
    """Rename the finished directory ``tmp`` to ``out`` in one step.

    With ``replace`` None, ``out`` must not exist (or be an empty directory). Otherwise
    ``out`` must still be the directory ``replace`` identified: it is renamed aside, ``tmp``
    takes its place, and only then is the old one removed.

    Raises:
        PublishConflict: another writer published ``out`` (or replaced it) meanwhile; its
            directory is left in place and ``tmp`` is left for the caller to remove.
    """
    if replace is None:
        if os.path.lexists(out) and not _is_empty_dir(out):
            raise PublishConflict(f"'{out}' appeared")
        try:
            os.rename(tmp, out)  # atomic; fails on a non-empty directory that appeared
        except OSError as exc:
            raise PublishConflict(f"'{out}' appeared") from exc
        fsync_dir(out.parent)
        return
    trash = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    try:
        os.rename(out, trash)
    except FileNotFoundError as exc:
        raise PublishConflict(f"'{out}' changed") from exc
    if dir_identity(trash, marker) != replace:
        with contextlib.suppress(OSError):
            os.rename(trash, out)  # not the one this writer meant to replace: put it back
        raise PublishConflict(f"'{out}' changed")
    try:
        os.rename(tmp, out)
    except OSError as exc:  # a third writer published between the two renames
        with contextlib.suppress(OSError):
            os.rename(trash, out)
        raise PublishConflict(f"'{out}' changed") from exc
    fsync_dir(out.parent)
    shutil.rmtree(trash, ignore_errors=True)
