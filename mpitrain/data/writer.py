"""Write arrays as HDF5 shards plus a manifest; every file lands under its final name last.

A dataset is written into a fresh hidden directory (unique per writer) and published with one
rename. ``overwrite`` replaces only a directory that is a dataset this module wrote (its
manifest names every file in it) and that no other writer replaced meanwhile.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpitrain.data.dataset import file_sha256
from mpitrain.data.manifest import (
    LOCK,
    MANIFEST,
    ArraySpec,
    Manifest,
    ShardEntry,
    SplitEntry,
    check_name,
    load_manifest,
    write_manifest,
)
from mpitrain.data.reader import CheckedSource, index_problem
from mpitrain.data.reader import Source as Source  # re-exported: converters import it here
from mpitrain.data.tokens import extra_files
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime import files

#: target bytes per HDF5 chunk (see docs/data.md for the measurement behind it)
CHUNK_BYTES = 1 << 20
COMPRESSIONS = (None, "none", "lzf", "gzip")
SPACE_HINT = "free some space (or pick another --out) and re-run"


def chunk_samples(sample_bytes: int, samples_per_shard: int) -> int:
    """Return samples per chunk: about CHUNK_BYTES per chunk, at least 1, at most a shard."""
    return int(max(1, min(samples_per_shard, CHUNK_BYTES // max(1, sample_bytes))))


def shard_name(name: str, index: int) -> str:
    """Return the file name of shard ``index``: ``NAME-00000.h5``."""
    return f"{name}-{index:05d}.h5"


def write_shard(
    path: Path, arrays: dict[str, np.ndarray], chunk: int, compression: str | None
) -> None:
    """Write one shard file atomically (unique temporary name, fsync, rename).

    Raises:
        DataError: the write failed; it names the file and the space it needed.
    """
    import h5py

    comp = None if compression in (None, "none") else compression
    try:
        with files.temporary_path(path) as tmp, h5py.File(tmp, "w") as f:
            for key, arr in arrays.items():
                chunks = (min(chunk, max(1, len(arr))), *arr.shape[1:])
                f.create_dataset(key, data=arr, chunks=chunks, compression=comp)
    except OSError as exc:
        needed = sum(int(a.nbytes) for a in arrays.values())
        raise DataError(with_hint(files.write_failure(path, exc, needed), SPACE_HINT)) from None


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
    for key, arr in arrays.items():
        if np.ndim(arr) == 0:
            raise DataError(
                with_hint(f"array '{key}' is a single value, not one value per sample",
                          "save arrays whose first axis is the sample")
            )
    n = len(arrays["x"])
    if n == 0:
        raise DataError(with_hint("the source has no samples", "check the input"))
    for key, arr in arrays.items():
        if len(arr) != n:
            raise DataError(
                with_hint(f"array '{key}' has {len(arr)} samples, 'x' has {n}", "align the arrays")
            )
    return n


def split_file_name(name: str, data: bytes) -> str:
    """``split-NAME-<12 hex of its SHA-256>.npy``: a new split never reuses an old file name."""
    return f"split-{name}-{hashlib.sha256(data).hexdigest()[:12]}.npy"


def write_split(
    directory: Path, name: str, indices: np.ndarray, num_samples: int | None = None
) -> SplitEntry:
    """Write split ``name`` as a sorted index file named by its content; return its entry.

    Raises:
        DataError: a bad name, indices that repeat or (given ``num_samples``) fall outside
            ``[0, num_samples)``, or a failed write (naming the file and the space needed).
    """
    check_name(name, "split name")
    idx = np.sort(np.asarray(indices, dtype=np.int64).ravel())
    problem = index_problem(idx, num_samples if num_samples is not None else 1 << 62, len(idx))
    if problem:
        raise DataError(with_hint(f"split '{name}' {problem}", "pass unique sample indices"))
    buf = io.BytesIO()
    np.save(buf, idx)
    data = buf.getvalue()
    path = directory / split_file_name(name, data)
    sha = hashlib.sha256(data).hexdigest()
    if not (path.is_file() and file_sha256(path) == sha):
        try:
            files.write_atomic(path, data)
        except OSError as exc:
            raise DataError(with_hint(files.write_failure(path, exc, len(data)),
                                      SPACE_HINT)) from None
    return SplitEntry(path.name, len(idx), sha)


class ArraySource:
    """In-memory arrays as a conversion source (``x``, ``y`` and extras, samples first)."""

    def __init__(self, arrays: dict[str, np.ndarray], origin: str = "the arrays") -> None:
        self.num_samples = check_arrays(arrays)
        self.arrays = arrays
        #: where the arrays came from, for error messages (a file name)
        self.origin = origin

    def specs(self) -> dict[str, ArraySpec]:
        """Per-sample shape and dtype of every array."""
        return {
            k: ArraySpec(tuple(int(d) for d in a.shape[1:]), str(a.dtype))
            for k, a in self.arrays.items()
        }

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Return samples ``[start, stop)`` of every array."""
        return {k: np.ascontiguousarray(a[start:stop]) for k, a in self.arrays.items()}


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
    chunk = chunk_samples(sum(s.sample_bytes for s in specs.values()), samples_per_shard)
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
    sample_bytes = sum(s.sample_bytes for s in specs.values())
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    counts = {k: counts[k] for k in sorted(counts, key=int)}
    num_classes = getattr(source, "num_classes", None)
    if num_classes is None and counts:
        num_classes = max(int(k) for k in counts) + 1
    notes = getattr(source, "notes", [])
    vocab = getattr(source, "vocab", None)  # token data: what the trainer checks ids against
    return Manifest(
        name=name,
        num_samples=source.num_samples,
        arrays=specs,
        shards=[r.entry for r in sorted(results, key=lambda r: r.entry.file)],
        chunk_samples=chunk_samples(sample_bytes, samples_per_shard),
        compression=None if compression in (None, "none") else compression,
        num_classes=num_classes,
        class_counts=counts,
        splits=splits,
        params={**params, **({"converted": "; ".join(notes)} if notes else {}),
                **({"vocab": vocab} if vocab is not None else {})},
    )


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def check_inputs(out: Path, inputs: Sequence[Path]) -> None:
    """Raise DataError when ``out`` is, contains or lies inside one of ``inputs``."""
    target = _absolute(out).resolve()
    for p in inputs:
        src = _absolute(p).resolve()
        if src == target or src.is_relative_to(target):
            raise DataError(with_hint(f"--out '{out}' holds the input '{p}'",
                                      "write the dataset to a directory of its own"))
        if target.is_relative_to(src):
            raise DataError(with_hint(f"--out '{out}' lies inside the input '{p}'",
                                      "write the dataset outside its input"))


def foreign_entries(directory: Path, manifest: Manifest) -> list[str]:
    """Names in ``directory`` that its manifest does not name (and that are no temporaries)."""
    ours = {MANIFEST, LOCK, *(s.file for s in manifest.shards),
            *(sp.file for sp in manifest.splits.values()), *extra_files(manifest, directory)}
    return sorted(
        p.name for p in directory.iterdir()
        if not ((p.name in ours and p.is_file() and not p.is_symlink())
                or files.is_temporary_name(p.name))
    )


def check_target(
    out: Path, overwrite: bool, inputs: Sequence[Path] = ()
) -> files.DirIdentity | None:
    """Raise unless ``out`` may be written; return the identity of the dataset it replaces.

    ``out`` may be absent or an empty directory. With ``overwrite`` it may also be a dataset
    directory that holds nothing its manifest does not name. It may never be, contain or lie
    inside an input of the same command.
    """
    check_inputs(out, inputs)
    target = _absolute(out)
    if not os.path.lexists(target):
        return None
    if target.is_symlink():
        raise DataError(with_hint(f"--out '{out}' is a symbolic link",
                                  "pass the directory it points to, or another --out"))
    if target.is_dir() and not any(target.iterdir()):
        return None
    if not overwrite:
        raise DataError(
            with_hint(f"'{out}' already exists", "pass --overwrite to replace it, or pick --out")
        )
    refuse = "so --overwrite will not replace it"
    if not target.is_dir():
        raise DataError(with_hint(f"--out '{out}' is a file, not a dataset directory, {refuse}",
                                  "remove it yourself or pick another --out"))
    try:
        manifest = load_manifest(target)
    except DataError as exc:
        first = sorted(p.name for p in target.iterdir())[0]
        raise DataError(
            with_hint(f"--out '{out}' (holding '{first}' ...) is not a dataset made by "
                      f"data_tools, {refuse} ({str(exc).split('. HINT:')[0]})",
                      "remove it yourself if it is safe to, or pick another --out")
        ) from None
    foreign = foreign_entries(target, manifest)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataError(
            with_hint(f"--out '{out}' holds '{foreign[0]}'{more}, which its manifest does not "
                      f"name, {refuse}", "move those files out, or pick another --out")
        )
    return files.dir_identity(target, MANIFEST)


def make_temp_dir(out: Path) -> Path:
    """Create the fresh hidden directory a writer into ``out`` fills (unique per writer)."""
    try:
        return files.make_temp_dir(_absolute(out))
    except OSError as exc:
        raise DataError(
            with_hint(f"cannot create a directory beside '{out}': {exc.strerror or exc}",
                      "pick an --out in a writable directory")
        ) from None


def publish(tmp: Path, out: Path, replace: files.DirIdentity | None) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing the dataset ``replace`` identified.

    A dataset another writer published at ``out`` meanwhile is kept: DataError says so (and
    ``tmp`` is left for the caller to remove).
    """
    try:
        files.publish_dir(tmp, _absolute(out), replace=replace, marker=MANIFEST)
    except files.PublishConflict:
        if replace is None:
            raise DataError(
                with_hint(f"'{out}' appeared while this conversion was writing (another writer "
                          "published there first; its dataset is kept)",
                          "use that dataset, or re-run with --overwrite to replace it")
            ) from None
        raise DataError(
            with_hint(f"'{out}' changed while this conversion was writing (another writer "
                      "replaced it; its dataset is kept)",
                      "re-run with --overwrite if this conversion should replace it")
        ) from None
    except OSError as exc:
        raise DataError(with_hint(f"cannot publish '{out}': {exc}", SPACE_HINT)) from None


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
    num_classes: int | None = None,
    vocab: int | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write a dataset directory from arrays (or a Source) in this process.

    Features become float32 and labels int64 (reported in the manifest's params); NaN or
    infinite features and labels that are not integers in ``[0, num_classes)`` are refused.
    With ``vocab``, ``x`` holds token ids in ``[0, vocab)`` instead (stored as integers; the
    manifest's params record ``vocab``). ``extra`` files (name -> bytes, such as a
    tokenizer) are written beside the shards and named in ``params.extra_files`` with their
    SHA-256. Everything goes into a fresh hidden directory renamed into place at the end, so
    an interrupted run leaves no manifest pointing at partial shards. ``overwrite`` replaces
    only a dataset directory (see :func:`check_target`).
    """
    out = Path(out_dir)
    check_name(name, "dataset name")
    check_options(compression, samples_per_shard)
    for key in extra or {}:
        check_name(key, "extra file name")
    raw: Source = ArraySource(arrays) if isinstance(arrays, dict) else arrays
    source = CheckedSource(raw, num_classes, vocab)
    replace = check_target(out, overwrite)
    tmp = make_temp_dir(out)
    try:
        sums = {key: write_extra(tmp / key, data) for key, data in (extra or {}).items()}
        results = write_shards(
            tmp,
            source,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            shards=range(shard_count(source.num_samples, samples_per_shard)),
        )
        split_entries = {
            k: write_split(tmp, k, v, source.num_samples) for k, v in (splits or {}).items()
        }
        manifest = build_manifest(
            source,
            results,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            splits=split_entries,
            params={**(params or {}), **({"extra_files": sums} if sums else {})},
        )
        write_manifest(tmp, manifest)
        publish(tmp, out, replace)
    finally:
        files.remove_path(tmp)  # gone after a publish; nothing partial survives a failure
    return out


def write_extra(path: Path, data: bytes) -> str:
    """Write one extra file atomically; return its SHA-256 (DataError names a failed write)."""
    try:
        files.write_atomic(path, data)
    except OSError as exc:
        raise DataError(with_hint(files.write_failure(path, exc, len(data)), SPACE_HINT)) from None
    return hashlib.sha256(data).hexdigest()


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
