"""Split manifests: index files for train/val/test without copying any sample."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np

from mpitrain.data.dataset import ShardedDataset
from mpitrain.data.manifest import load_manifest, write_manifest
from mpitrain.data.writer import write_split
from mpitrain.errors import DataError, with_hint

METHODS = ("random", "stratified", "kfold", "time")


def fraction_sizes(n: int, fractions: list[float]) -> list[int]:
    """Return part sizes for ``fractions`` of ``n`` (largest remainders; they sum to n)."""
    total = sum(fractions)
    if total <= 0 or any(f < 0 for f in fractions):
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


def add_splits(directory: Path, parts: dict[str, np.ndarray]) -> None:
    """Write split index files and rewrite the manifest atomically with them added."""
    manifest = load_manifest(directory)
    entries = dict(manifest.splits)
    for name, idx in parts.items():
        entries[name] = write_split(directory, name, idx)
    write_manifest(directory, replace(manifest, splits=entries))


def read_array(directory: Path, key: str) -> np.ndarray:
    """Read one named array of the whole dataset (labels or a time key)."""
    ds = ShardedDataset(directory)
    if key not in ds.manifest.arrays:
        raise DataError(
            with_hint(f"dataset '{directory}' has no array '{key}'", "convert with that array")
        )
    return ds.read_arrays(np.arange(len(ds)), keys=(key,))[0]
