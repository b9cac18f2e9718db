"""Write arrays as HDF5 shards plus a manifest; every file lands under its final name last."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


class ArraySource:
    """In-memory arrays as a conversion source (``x``, ``y`` and extras, samples first)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.num_samples = check_arrays(arrays)
        self.arrays = arrays

    def specs(self) -> dict[str, ArraySpec]:
        """Per-sample shape and dtype of every array."""
        return {
            k: ArraySpec(tuple(int(d) for d in a.shape[1:]), str(a.dtype))
            for k, a in self.arrays.items()
        }

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Return samples ``[start, stop)`` of every array."""
        return {k: np.ascontiguousarray(a[start:stop]) for k, a in self.arrays.items()}


class Source(Protocol):
    """What a converter reads from: a sample count, specs, and contiguous sample ranges."""

    num_samples: int

    def specs(self) -> dict[str, ArraySpec]: ...

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]: ...


@dataclass
class ShardResult:
    """What writing one shard produced (gathered to the manifest writer)."""

    entry: ShardEntry
    counts: dict[str, int]


def write_shards(
    tmp: Path,
    source: Source,
    *,
    name: str,
    samples_per_shard: int,
    compression: str | None,
    shards: Iterable[int],
) -> list[ShardResult]:
    """Write shards ``shards`` (indices) of ``source`` into ``tmp``; return their entries.

    Shard ``i`` always holds samples ``[i*K, (i+1)*K)``, whoever writes it, so a parallel
    conversion produces the same shards as a serial one.
    """
    specs = source.specs()
    sample_bytes = sum(int(np.dtype(s.dtype).itemsize * math.prod(s.shape)) for s in specs.values())
    chunk = chunk_samples(sample_bytes, samples_per_shard)
    out = []
    for i in shards:
        start = i * samples_per_shard
        part = source.read(start, min(start + samples_per_shard, source.num_samples))
        path = tmp / shard_name(name, i)
        write_shard(path, part, chunk, compression)
        out.append(
            ShardResult(
                ShardEntry(path.name, len(part["x"]), file_sha256(path)), class_counts(part["y"])
            )
        )
    return out


def build_manifest(
    source: Source,
    results: list[ShardResult],
    *,
    name: str,
    samples_per_shard: int,
    compression: str | None,
    splits: dict[str, SplitEntry],
    params: dict[str, Any],
) -> Manifest:
    """Return the manifest for all shards' results (in shard order)."""
    specs = source.specs()
    sample_bytes = sum(int(np.dtype(s.dtype).itemsize * math.prod(s.shape)) for s in specs.values())
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    counts = {k: counts[k] for k in sorted(counts, key=int)}
    return Manifest(
        name=name,
        num_samples=source.num_samples,
        arrays=specs,
        shards=[r.entry for r in sorted(results, key=lambda r: r.entry.file)],
        chunk_samples=chunk_samples(sample_bytes, samples_per_shard),
        compression=None if compression in (None, "none") else compression,
        num_classes=(max(int(k) for k in counts) + 1) if counts else None,
        class_counts=counts,
        splits=splits,
        params=params,
    )


def check_target(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` may be (re)written."""
    if out.exists() and not overwrite:
        raise DataError(
            with_hint(f"'{out}' already exists", "pass --overwrite to replace it, or pick --out")
        )


def temp_dir_for(out: Path, tag: str) -> Path:
    """Return the hidden temporary directory a conversion into ``out`` writes to."""
    return out.with_name(f".{out.name}.{tag}.tmp")


def publish(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Rename the finished ``tmp`` directory to ``out`` (replacing an old one last).

    Without ``overwrite``, a dataset that appeared at ``out`` meanwhile (a concurrent writer)
    is kept and ``tmp`` removed: DataError says so.
    """
    if out.exists() and not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(with_hint(f"'{out}' appeared while writing", "another writer won; use it"))
    if out.exists():
        trash = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def write_dataset(
    out_dir: str | Path,
    arrays: dict[str, np.ndarray] | Source,
    *,
    name: str,
    samples_per_shard: int,
    compression: str | None = None,
    splits: dict[str, np.ndarray] | None = None,
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a dataset directory from arrays (or a Source) in this process.

    Everything goes into a hidden temporary directory renamed into place at the end, so an
    interrupted run leaves no manifest pointing at partial shards. An existing dataset is
    replaced only with ``overwrite=True``.
    """
    out = Path(out_dir)
    source: Source = ArraySource(arrays) if isinstance(arrays, dict) else arrays
    check_options(compression, samples_per_shard)
    check_target(out, overwrite)
    tmp = temp_dir_for(out, str(os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        results = write_shards(
            tmp,
            source,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            shards=range(shard_count(source.num_samples, samples_per_shard)),
        )
        split_entries = {k: write_split(tmp, k, v) for k, v in (splits or {}).items()}
        manifest = build_manifest(
            source,
            results,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            splits=split_entries,
            params=dict(params or {}),
        )
        write_manifest(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial survives a failed write
        raise
    publish(tmp, out, overwrite)
    return out


def check_options(compression: str | None, samples_per_shard: int) -> None:
    """Raise DataError for an unknown compression or a bad shard size."""
    if compression not in COMPRESSIONS:
        raise DataError(
            with_hint(f"compression {compression!r} is unknown", "use none, lzf or gzip")
        )
    if samples_per_shard < 1:
        raise DataError(
            with_hint("samples per shard must be >= 1", "e.g. --samples-per-shard 50000")
        )


def shard_count(n: int, samples_per_shard: int) -> int:
    """Return how many shards ``n`` samples make."""
    return math.ceil(n / samples_per_shard)
