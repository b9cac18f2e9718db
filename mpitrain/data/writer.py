"""Write arrays as HDF5 shards plus a manifest; every file lands under its final name last."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mpitrain.data.dataset import file_sha256
from mpitrain.data.manifest import ArraySpec, Manifest, ShardEntry, SplitEntry, write_manifest
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.files import fsync_dir, write_atomic

#: target bytes per HDF5 chunk (see docs/data.md for the measurement behind it)
CHUNK_BYTES = 1 << 20
COMPRESSIONS = (None, "none", "lzf", "gzip")


def chunk_samples(sample_bytes: int, samples_per_shard: int) -> int:
    """Return samples per chunk: about CHUNK_BYTES per chunk, at least 1, at most a shard."""
    return int(max(1, min(samples_per_shard, CHUNK_BYTES // max(1, sample_bytes))))


def shard_name(name: str, index: int) -> str:
    """Return the file name of shard ``index``: ``NAME-00000.h5``."""
    return f"{name}-{index:05d}.h5"


def write_shard(
    path: Path, arrays: dict[str, np.ndarray], chunk: int, compression: str | None
) -> None:
    """Write one shard file atomically (temporary name, fsync, rename)."""
    import h5py

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comp = None if compression in (None, "none") else compression
    with h5py.File(tmp, "w") as f:
        for key, arr in arrays.items():
            chunks = (min(chunk, max(1, len(arr))), *arr.shape[1:])
            f.create_dataset(key, data=arr, chunks=chunks, compression=comp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def class_counts(y: np.ndarray) -> dict[str, int]:
    """Return label -> count for integer labels (empty for other label types)."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        return {}
    values, counts = np.unique(y, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def check_arrays(arrays: dict[str, np.ndarray]) -> int:
    """Return the sample count, or raise DataError naming the bad array."""
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(with_hint(f"no array named '{key}' to convert", "pass x and y arrays"))
    n = len(arrays["x"])
    if n == 0:
        raise DataError(with_hint("the source has no samples", "check the input"))
    for key, arr in arrays.items():
        if len(arr) != n:
            raise DataError(
                with_hint(f"array '{key}' has {len(arr)} samples, 'x' has {n}", "align the arrays")
            )
    return n


def write_split(directory: Path, name: str, indices: np.ndarray) -> SplitEntry:
    """Write split ``name`` as a sorted ``split-NAME.npy`` index file; return its entry."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.sort(np.asarray(indices, dtype=np.int64)))
    data = buf.getvalue()
    fname = f"split-{name}.npy"
    write_atomic(directory / fname, data)
    return SplitEntry(fname, len(indices), hashlib.sha256(data).hexdigest())


def write_dataset(
    out_dir: str | Path,
    arrays: dict[str, np.ndarray],
    *,
    name: str,
    samples_per_shard: int,
    compression: str | None = None,
    splits: dict[str, np.ndarray] | None = None,
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``arrays`` (``x``, ``y`` and extras, first axis = samples) as a dataset directory.

    Everything is written into a hidden temporary directory that is renamed into place at the
    end, so an interrupted run leaves no manifest pointing at partial shards. An existing
    dataset is replaced only with ``overwrite=True``.
    """
    out = Path(out_dir)
    n = check_arrays(arrays)
    if compression not in COMPRESSIONS:
        raise DataError(
            with_hint(f"compression {compression!r} is unknown", "use none, lzf or gzip")
        )
    if samples_per_shard < 1:
        raise DataError(
            with_hint("samples per shard must be >= 1", "e.g. --samples-per-shard 50000")
        )
    if out.exists() and not overwrite:
        raise DataError(
            with_hint(f"'{out}' already exists", "pass --overwrite to replace it, or pick --out")
        )
    sample_bytes = sum(int(a[0].nbytes) for a in arrays.values())
    chunk = chunk_samples(sample_bytes, samples_per_shard)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, n, samples_per_shard)):
        part = {
            k: np.ascontiguousarray(a[start : start + samples_per_shard]) for k, a in arrays.items()
        }
        path = tmp / shard_name(name, i)
        write_shard(path, part, chunk, compression)
        shards.append(ShardEntry(path.name, len(part["x"]), file_sha256(path)))
    split_entries = {k: write_split(tmp, k, v) for k, v in (splits or {}).items()}
    counts = class_counts(arrays["y"])
    manifest = Manifest(
        name=name,
        num_samples=n,
        arrays={
            k: ArraySpec(tuple(int(d) for d in a.shape[1:]), str(a.dtype))
            for k, a in arrays.items()
        },
        shards=shards,
        chunk_samples=chunk,
        compression=None if compression in (None, "none") else compression,
        num_classes=(max(int(k) for k in counts) + 1) if counts else None,
        class_counts=counts,
        splits=split_entries,
        params=dict(params or {}),
    )
    write_manifest(tmp, manifest)
    if out.exists():
        trash = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def shard_count(n: int, samples_per_shard: int) -> int:
    """Return how many shards ``n`` samples make."""
    return math.ceil(n / samples_per_shard)
