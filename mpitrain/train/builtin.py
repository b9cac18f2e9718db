"""The built-in datasets, cached as HDF5 shards: scikit-learn's bundled handwritten digits
and a byte-level text corpus made from the Python standard library's sources."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.errors import DataError, with_hint
from mpitrain.runtime import env

if TYPE_CHECKING:
    from mpi4py import MPI

DIGITS_NAME = "digits-v1"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
CORPUS_VERSION = "v1"  # bump when the corpus' layout changes: old caches are then left alone


def cache_root() -> Path:
    """Return $MPITRAIN_CACHE, else $XDG_CACHE_HOME/mpitrain, else ~/.cache/mpitrain."""
    explicit = env.get("cache")
    if explicit:
        return Path(explicit)
    xdg = env.get("xdg_cache_home")
    base = Path(xdg) if xdg else Path(env.get("home") or Path.home()) / ".cache"
    return base / "mpitrain"


def digits_arrays() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return digits as float32 images in [0, 1] (N, 8, 8) and int64 labels, plus a split.

    The train/test split is stratified and seeded (``SPLIT_SEED``), independent of the run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    train, test = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {"x": x, "y": y}, {"train": np.sort(train), "test": np.sort(test)}


def ensure_cached(
    comm: MPI.Intracomm, out: Path, what: str, write: Callable[[Path], object]
) -> Path:
    """Collective: return the dataset directory ``out``, rank 0 running ``write(out)`` first
    unless it already holds a manifest.

    The other ranks wait for rank 0; a failure there is raised on every rank, and a cache
    that rank 0 wrote but this rank cannot see is refused here.
    """
    error: str | None = None
    if comm.rank == 0 and not (out / "manifest.json").exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write(out)
        except (OSError, DataError) as exc:
            # another job sharing the cache may have published it first: that copy is as good
            if not (out / "manifest.json").exists():
                error = with_hint(
                    f"rank 0: cannot create the {what} cache in '{out}': {exc}",
                    "set MPITRAIN_CACHE to a writable directory",
                )
    error = comm.bcast(error, root=0)
    if error is not None:
        raise DataError(error)
    if not os.access(out / "manifest.json", os.R_OK):
        raise DataError(
            with_hint(
                f"rank {comm.rank}: {what} cache '{out}' is not visible on this node",
                "point MPITRAIN_CACHE at a shared filesystem",
            )
        )
    return out


def write_digits(out: Path) -> Path:
    """Write the digits dataset (see :func:`digits_arrays`) as shards into ``out``."""
    from mpitrain.data.writer import write_dataset

    arrays, splits = digits_arrays()
    return write_dataset(
        out,
        arrays,
        name="digits",
        samples_per_shard=512,
        splits=splits,
        params={
            "source": "sklearn.datasets.load_digits",
            "split_seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
            "scale": "x/16",
        },
    )


def ensure_digits(comm: MPI.Intracomm) -> Path:
    """Collective: return the digits shard directory, creating it on rank 0 on first use.

    The other ranks wait for rank 0; a failure there is raised on every rank.
    """
    return ensure_cached(comm, cache_root() / DIGITS_NAME, "digits", write_digits)


def corpus_dir(context: int) -> Path:
    """Return the cache directory of the stdlib byte corpus for ``context``."""
    return cache_root() / f"pystdlib-ctx{context}-{CORPUS_VERSION}"


def ensure_corpus(comm: MPI.Intracomm, context: int) -> Path:
    """Collective: return the Python-stdlib byte corpus directory for windows of
    ``context + 1`` bytes, creating it on rank 0 on first use (default byte caps).

    The other ranks wait for rank 0; a failure there is raised on every rank. The bytes
    come from the Python that first wrote the cache: its manifest's params record that
    Python's version and the SHA-256 of each split's bytes.
    """
    from mpitrain.data.corpus import write_corpus

    return ensure_cached(
        comm,
        corpus_dir(context),
        "stdlib corpus",
        lambda out: write_corpus(out, context),
    )
