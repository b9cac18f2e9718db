"""A byte-level text corpus made from this Python's own standard library sources.

Present on every machine without a download. Files are split by a hash of their relative
path, so the split is fixed for a given Python; the manifest records SHA-256 digests of the
bytes of each split, so two machines can tell whether their corpora differ.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from mpitrain.data.writer import check_target, write_dataset
from mpitrain.errors import DataError, with_hint

SOURCE = "python-stdlib"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
MAX_TRAIN_BYTES = 2 << 20
MAX_TEST_BYTES = 256 << 10
TEST_PERCENT = 10
NAME = "pystdlib"
SAMPLES_PER_SHARD = 4096


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """Return (relative posix path, absolute path) of every ``*.py`` under the stdlib.

    ``site-packages``, ``dist-packages`` and ``__pycache__`` directories are skipped; the
    list is sorted by relative path. ``root`` defaults to ``sysconfig``'s ``stdlib`` path.
    """
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    found = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            found.append((rel.as_posix(), path.absolute()))
    return sorted(found)


def _digest(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()


def split_of(relpath: str, test_percent: int = TEST_PERCENT) -> str:
    """Return "test" for about ``test_percent`` % of files (by a hash of the path), else "train"."""
    return "test" if int(_digest(relpath)[:8], 16) % 100 < test_percent else "train"


def take_files(files: list[tuple[str, Path]], cap: int) -> tuple[list[str], list[int], bytes, int]:
    """Read files in order of their path's SHA-256 until ``cap`` bytes are taken.

    Returns the names of the files used, the offset where each starts in the concatenation,
    the concatenated bytes (the last file cut to exactly ``cap``) and how many files were
    skipped for not being UTF-8. Empty files are left out.
    """
    names: list[str] = []
    starts: list[int] = []
    parts: list[bytes] = []
    size = skipped = 0
    for rel, path in sorted(files, key=lambda f: _digest(f[0])):
        if size >= cap:
            break
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(with_hint(f"cannot read stdlib file '{path}': {exc}",
                                      "repair the Python installation")) from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if data:
            names.append(rel)
            starts.append(size)
            parts.append(data[: cap - size])
            size += len(parts[-1])
    return names, starts, b"".join(parts), skipped


def windows(data: bytes | np.ndarray, context: int) -> np.ndarray:
    """Cut ``data`` (bytes, or a 1-D array of token ids) into windows of ``context + 1``
    tokens with stride ``context`` (bytes become uint8; an array keeps its dtype)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
    n = max(0, (len(buf) - 1) // context)
    if n == 0:
        return np.empty((0, context + 1), dtype=buf.dtype)
    view = np.lib.stride_tricks.sliding_window_view(buf, context + 1)[::context]
    return np.ascontiguousarray(view[:n])


def labelled_windows(
    data: bytes | np.ndarray, starts: list[int] | np.ndarray, context: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return the :func:`windows` of ``data`` and, per window, the index of the file it starts
    in: ``starts`` are the files' first positions in a stream of which ``data`` begins at
    position ``offset``."""
    win = windows(data, context)
    first = offset + np.arange(len(win), dtype=np.int64) * context
    return win, (np.searchsorted(starts, first, side="right") - 1).astype(np.int64)


def corpus_windows(
    context: int,
    *,
    max_train_bytes: int = MAX_TRAIN_BYTES,
    max_test_bytes: int = MAX_TEST_BYTES,
    test_percent: int = TEST_PERCENT,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Return arrays ``x`` (windows, uint8) and ``y`` (file index), splits and params.

    ``x`` holds every train window, then every test window; ``y[i]`` is the index, in its
    split's file list (``params["file_lists"]``), of the file window ``i`` starts in.

    Raises:
        DataError: a bad option, no ``.py`` files, or a split with fewer than 2 windows.
    """
    if context < 1 or min(max_train_bytes, max_test_bytes) < 1 or not 0 < test_percent < 100:
        raise DataError(with_hint(
            f"corpus options context={context}, caps {max_train_bytes}/{max_test_bytes} bytes, "
            f"test percent {test_percent} are out of range",
            "use a context >= 1, caps >= 1 byte and a test percent in 1..99"))
    files = stdlib_files()
    if not files:
        where = sysconfig.get_paths()["stdlib"]
        raise DataError(with_hint(f"the standard library directory '{where}' has no .py files",
                                  "use a Python installation that ships its sources"))
    caps = {"train": max_train_bytes, "test": max_test_bytes}
    xs, ys, names, digests, skipped = [], [], {}, {}, 0
    for split, cap in caps.items():
        mine = [f for f in files if split_of(f[0], test_percent) == split]
        names[split], starts, data, bad = take_files(mine, cap)
        skipped += bad
        win, labels = labelled_windows(data, starts, context)
        if len(win) < 2:
            raise DataError(with_hint(
                f"the {split} split of the stdlib corpus has {len(win)} windows of "
                f"{context + 1} bytes ({len(data)} bytes)",
                "raise its byte cap or lower the context"))
        xs.append(win)
        ys.append(labels)
        digests[split] = hashlib.sha256(data).hexdigest()
    ntrain, ntest = len(xs[0]), len(xs[1])
    arrays = {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64)}
    splits = {"train": np.arange(ntrain), "test": np.arange(ntrain, ntrain + ntest)}
    params: dict[str, Any] = {
        "source": SOURCE,
        "python": sys.version.split()[0],
        "context": context,
        "max_train_bytes": max_train_bytes,
        "max_test_bytes": max_test_bytes,
        "test_percent": test_percent,
        "num_files": {k: len(v) for k, v in names.items()},
        "skipped_non_utf8": skipped,
        "sha256": digests,
        "file_lists": names,
    }
    return arrays, splits, params


def num_classes(params: dict[str, Any]) -> int:
    """Return the label count of a corpus: the most files any split uses."""
    return max(int(n) for n in params["num_files"].values())


def write_corpus(
    out: Path,
    context: int,
    *,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    overwrite: bool = False,
    **caps: int,
) -> Path:
    """Write the corpus for ``context`` as a dataset directory ``out`` (in this process).

    ``caps`` are ``corpus_windows``' keywords (byte caps, test percent); ``overwrite``
    replaces only a dataset directory (see ``mpitrain.data.writer.check_target``).
    """
    check_target(out, overwrite)  # refuse an unusable ``out`` before reading the stdlib
    arrays, splits, params = corpus_windows(context, **caps)
    return write_dataset(out, arrays, name=NAME, samples_per_shard=samples_per_shard,
                         splits=splits, params=params, overwrite=overwrite,
                         num_classes=num_classes(params))
