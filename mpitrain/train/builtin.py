"""The built-in dataset: scikit-learn's bundled handwritten digits, cached as HDF5 shards."""

from __future__ import annotations

import os
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


def ensure_digits(comm: MPI.Intracomm) -> Path:
    """Collective: return the digits shard directory, creating it on rank 0 on first use.

    The other ranks wait for rank 0; a failure there is raised on every rank.
    """
    from mpitrain.data.writer import write_dataset

    out = cache_root() / DIGITS_NAME
    error: str | None = None
    if comm.rank == 0 and not (out / "manifest.json").exists():
        try:
            arrays, splits = digits_arrays()
            out.parent.mkdir(parents=True, exist_ok=True)
            write_dataset(
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
        except (OSError, DataError) as exc:
            # another job sharing the cache may have published it first: that copy is as good
            if not (out / "manifest.json").exists():
                error = with_hint(
                    f"rank 0: cannot create the digits cache in '{out}': {exc}",
                    "set MPITRAIN_CACHE to a writable directory",
                )
    error = comm.bcast(error, root=0)
    if error is not None:
        raise DataError(error)
    if not os.access(out / "manifest.json", os.R_OK):
        raise DataError(
            with_hint(
                f"rank {comm.rank}: digits cache '{out}' is not visible on this node",
                "point MPITRAIN_CACHE at a shared filesystem",
            )
        )
    return out
