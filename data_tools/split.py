"""Split manifests: index files for train/val/test without copying any sample."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from mpitrain.data.dataset import ShardedDataset, file_sha256
from mpitrain.data.manifest import SplitEntry, read_manifest, write_manifest
from mpitrain.data.writer import write_split
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.files import remove_path

METHODS = ("random", "stratified", "kfold", "time")


def fraction_sizes(n: int, fractions: list[float]) -> list[int]:
    """Return part sizes for ``fractions`` of ``n`` (largest remainders; they sum to n)."""
    total = sum(fractions)
    if not all(math.isfinite(f) and f >= 0 for f in fractions) or not total > 0:
        raise DataError(with_hint(f"bad fractions {fractions}", "e.g. --fractions 0.8,0.1,0.1"))
    raw = [n * f / total for f in fractions]
    sizes = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - sizes[i], reverse=True)[
        : n - sum(sizes)
    ]:
        sizes[i] += 1
    return sizes


def random_split(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """A seeded random partition of ``range(n)``."""
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *fraction_sizes(n, fractions)])
    return [np.sort(perm[a:b]) for a, b in itertools.pairwise(bounds)]


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """A partition keeping each class's proportions (within one sample per class and part)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        bounds = np.cumsum([0, *fraction_sizes(len(members), fractions)])
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            parts[i].append(members[a:b])
    return [np.sort(np.concatenate(p)) for p in parts]


def kfold_split(n: int, folds: int, fold: int, seed: int) -> list[np.ndarray]:
    """(train, test) of fold ``fold`` of a seeded K-fold partition."""
    if not 0 <= fold < folds or folds < 2:
        raise DataError(with_hint(f"fold {fold} of {folds} is invalid", "need 0 <= fold < folds"))
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(np.array_split(perm, folds)[fold])
    train = np.setdiff1d(np.arange(n), test)
    return [train, test]


def time_split(key: np.ndarray, fractions: list[float]) -> list[np.ndarray]:
    """Parts in order of ``key``: every sample of a later part is not earlier than any before."""
    order = np.argsort(key, kind="stable")
    bounds = np.cumsum([0, *fraction_sizes(len(key), fractions)])
    return [np.sort(order[a:b]) for a, b in itertools.pairwise(bounds)]


#: the index files data_tools writes: split-NAME.npy (older) or split-NAME-<sha prefix>.npy
_SPLIT_FILE = re.compile(r"^split-.+\.npy$")


def add_splits(directory: Path, parts: dict[str, np.ndarray]) -> None:
    """Add (or replace) splits without ever showing a reader old and new files mixed.

    New index files get new names (their content's hash); the manifest is then switched in
    one atomic rename, and only if nobody switched it meanwhile; last, the index files of
    replaced splits are removed when they are data_tools' own (named split-*.npy and still
    holding what the old manifest recorded). A reader that opened the old split keeps its
    indices; one that is opening it re-reads the new manifest. An interruption before the
    switch leaves the old manifest and its files as they were.
    """
    manifest, expect = read_manifest(directory)
    present = {p.name for p in directory.iterdir()}
    written: list[str] = []
    try:
        entries = dict(manifest.splits)
        for name, idx in parts.items():
            entries[name] = write_split(directory, name, idx, manifest.num_samples)
            if entries[name].file not in present:
                written.append(entries[name].file)
        write_manifest(directory, replace(manifest, splits=entries), expect=expect)
    except BaseException:
        for file in written:  # only what this call created; the old state stays whole
            remove_path(directory / file)
        raise
    named = {e.file for e in entries.values()}
    for name in parts:
        old = manifest.splits.get(name)
        if old is not None and old.file not in named and _own_split_file(directory, old):
            remove_path(directory / old.file)


def _own_split_file(directory: Path, entry: SplitEntry) -> bool:
    """Whether ``entry``'s file is one data_tools wrote and nobody changed since."""
    path = directory / entry.file
    return (
        _SPLIT_FILE.match(entry.file) is not None
        and path.is_file()
        and not path.is_symlink()
        and file_sha256(path) == entry.sha256
    )


def read_array(directory: Path, key: str) -> np.ndarray:
    """Read one named array of the whole dataset (labels or a time key)."""
    ds = ShardedDataset(directory)
    if key not in ds.manifest.arrays:
        raise DataError(
            with_hint(f"dataset '{directory}' has no array '{key}'", "convert with that array")
        )
    return ds.read_arrays(np.arange(len(ds)), keys=(key,))[0]
