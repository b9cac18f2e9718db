"""``ShardedDataset``: a read-only torch Dataset over HDF5 shards, opened lazily per process."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mpitrain.data.manifest import MANIFEST, Manifest, ShardEntry, load_manifest, safe_member
from mpitrain.data.reader import (
    GAP_BYTES,
    ChunkCache,
    check_declared_vocab,
    check_labels,
    check_tokens,
    copy_rows,
    first_bad_label,
    first_bad_token,
    hdf5_problem,
    index_problem,
    segments,
)
from mpitrain.errors import DataError, with_hint

#: bytes of decoded blocks a dataset keeps per process for cached reads
CACHE_BYTES = 128 << 20
#: cached reads fetch whole stored chunks, this many bytes' worth at a time
BLOCK_BYTES = 1 << 20
#: datasets up to this size are read into memory once per process (random access then costs
#: a numpy gather instead of HDF5 calls); larger ones are read batch by batch
IN_MEMORY_BYTES = 64 << 20
#: labels are range-checked when the dataset opens up to this many label bytes (beyond it,
#: batch by batch as they are read)
LABEL_CHECK_BYTES = 64 << 20
#: token ids (``tokens=``) are checked when the dataset opens up to this many bytes of ``x``
#: (beyond it, batch by batch as they are read), in reads of TOKEN_BLOCK_BYTES
TOKEN_CHECK_BYTES = 64 << 20
TOKEN_BLOCK_BYTES = 16 << 20
VERIFY_HINT = "run: python -m data_tools verify DIR, then re-convert the bad shards"


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """Return the SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_shard(
    directory: Path, manifest: Manifest, index: int, *, checksum: bool, labels: bool = False,
    tokens: int | None = None,
) -> None:
    """Raise DataError unless shard ``index`` exists, matches the manifest's arrays and reaches
    nothing outside itself; with ``labels``, also unless every label is in ``[0, classes)``;
    with ``tokens``, also unless every value of ``x`` is a token id in ``[0, tokens)``."""
    entry = manifest.shards[index]
    path = safe_member(directory, entry.file, "shard")
    if not path.exists():
        raise DataError(with_hint(f"shard '{path}' is missing", VERIFY_HINT))
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(with_hint(f"shard '{path}' cannot be read: {exc}", VERIFY_HINT)) from None
    declared = entry.num_samples * manifest.sample_bytes
    if manifest.compression is None and size < declared:
        raise DataError(
            with_hint(
                f"manifest '{directory / MANIFEST}': shard '{entry.file}' declares "
                f"{entry.num_samples} samples ({declared} bytes) but the file holds {size} bytes",
                VERIFY_HINT,
            )
        )
    if checksum and file_sha256(path) != entry.sha256:
        raise DataError(with_hint(f"shard '{path}' fails its SHA-256 checksum", VERIFY_HINT))
    try:
        _check_hdf5(path, manifest, entry, labels=labels, tokens=tokens)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).replace("\n", " ")
        raise DataError(
            with_hint(f"shard '{path}' cannot be read: {reason}", VERIFY_HINT)
        ) from None


def _check_hdf5(path: Path, manifest: Manifest, entry: ShardEntry, *, labels: bool,
                tokens: int | None) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        problem = hdf5_problem(f, manifest.arrays)
        if problem:
            key, why = problem
            hint = "re-convert the dataset with data_tools (it writes self-contained shards)"
            if why == "is missing":
                raise DataError(with_hint(f"shard '{entry.file}' has no dataset '{key}'",
                                          VERIFY_HINT))
            raise DataError(with_hint(f"shard '{path}': '{key}' {why}", hint))
        for key, spec in manifest.arrays.items():
            ds = f[key]
            want = (entry.num_samples, *spec.shape)
            if tuple(ds.shape) != want or str(ds.dtype) != spec.dtype:
                raise DataError(
                    with_hint(
                        f"shard '{entry.file}' dataset '{key}' is {tuple(ds.shape)} "
                        f"{ds.dtype}, manifest says {want} {spec.dtype}",
                        VERIFY_HINT,
                    )
                )
        if labels:
            check_labels(path, np.asarray(f["y"][()]), manifest.classes, 0)
        if tokens is not None:
            x = f["x"]
            rows = max(1, TOKEN_BLOCK_BYTES // max(1, manifest.arrays["x"].sample_bytes))
            for a in range(0, entry.num_samples, rows):
                check_tokens(path, np.asarray(x[a : a + rows]), tokens, a)


def load_split(directory: Path, manifest: Manifest, split: str, *, verify: bool) -> np.ndarray:
    """Read and check the index file of ``split``: sorted, unique, integer, inside the data."""
    entry = manifest.splits[split]
    spath = safe_member(directory, entry.file, f"split '{split}'")
    hint = "re-create it with: python -m data_tools split DIR ..."
    try:
        if verify and file_sha256(spath) != entry.sha256:
            raise DataError(with_hint(f"split file '{spath}' fails its checksum", VERIFY_HINT))
        idx = np.load(spath, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(with_hint(f"split file '{spath}' is missing", hint)) from None
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).replace("\n", " ")
        raise DataError(with_hint(f"split file '{spath}' cannot be read: {reason}", hint)) from None
    problem = index_problem(idx, manifest.num_samples, entry.num_samples)
    if problem:
        raise DataError(with_hint(f"split file '{spath}' {problem}", hint))
    return np.asarray(idx, dtype=np.int64)


def open_checked(
    directory: Path, split: str | None, *, verify: bool, tokens: int | None = None
) -> tuple[Manifest, np.ndarray | None]:
    """Load the manifest, check every shard and read the indices of ``split`` (if any).

    With ``tokens``, ``x`` must hold token ids in ``[0, tokens)``: checked here when it is
    at most TOKEN_CHECK_BYTES (else by :meth:`ShardedDataset.read_batch`, batch by batch).

    A split file that vanished because a re-split switched the manifest meanwhile is
    looked up once more in the new manifest.
    """
    for attempt in (0, 1):
        m = load_manifest(directory)
        labels = m.num_samples * np.dtype(m.arrays["y"].dtype).itemsize <= LABEL_CHECK_BYTES
        now = None
        if tokens is not None:
            check_declared_vocab(directory, m, tokens)
            small = m.num_samples * m.arrays["x"].sample_bytes <= TOKEN_CHECK_BYTES
            now = tokens if small else None
        for i in range(len(m.shards)):
            check_shard(directory, m, i, checksum=verify, labels=labels, tokens=now)
        if not split:
            return m, None
        if split not in m.splits:
            have = ", ".join(sorted(m.splits)) or "none"
            raise DataError(
                with_hint(
                    f"dataset '{directory}' has no split '{split}' (has: {have})",
                    "make one with: python -m data_tools split DIR ...",
                )
            )
        try:
            return m, load_split(directory, m, split, verify=verify)
        except DataError:
            if attempt or (directory / m.splits[split].file).exists():
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _read_slice(ds: Any, lo: int, hi: int) -> np.ndarray:
    return np.asarray(ds[lo:hi])


class ShardedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples of a data_tools dataset directory (optionally one named split of it).

    Opening checks the manifest and every shard's arrays (and checksums with ``verify=True``);
    the HDF5 files themselves are opened on first read in the reading process, so the object
    pickles and survives fork, spawn and forkserver. With ``tokens`` (a vocabulary size) the
    features are token ids: a value that is not an integer in ``[0, tokens)`` is a DataError
    naming the shard, sample, position and value, at open (small data) or in the batch that
    reads it.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        *,
        verify: bool = False,
        in_memory: bool | None = None,
        tokens: int | None = None,
    ) -> None:
        self.directory = Path(path)
        self.split = split
        self.tokens = tokens
        self.manifest, self.indices = open_checked(self.directory, split, verify=verify,
                                                   tokens=tokens)
        m = self.manifest
        self._num_classes = m.classes
        self._starts = np.cumsum([0] + [s.num_samples for s in m.shards])
        self._files: dict[int, Any] = {}
        self._cache = ChunkCache(CACHE_BYTES)
        self._scratch: dict[str, np.ndarray] = {}
        self._dsets: dict[tuple[int, str], Any] = {}
        self._pid = os.getpid()
        self._sample_bytes = m.sample_bytes
        total = m.num_samples * self._sample_bytes
        #: keep all samples in memory (read once, on first use): small datasets only
        self.in_memory = total <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
        self._ram: dict[str, np.ndarray] = {}

    # -- facts from the manifest (no I/O) --
    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self.manifest.num_samples

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Per-sample shape of ``x``."""
        return self.manifest.arrays["x"].shape

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample over all stored arrays."""
        return self._sample_bytes

    @property
    def block_samples(self) -> int:
        """Samples per cached read: whole chunks, about BLOCK_BYTES (the unit to shuffle by)."""
        cs = self.manifest.chunk_samples
        return cs * max(1, BLOCK_BYTES // max(1, cs * self._sample_bytes))

    @property
    def num_classes(self) -> int:
        """Number of classes (from the manifest, else max label + 1 over class counts)."""
        return self._num_classes

    # -- reading --
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        state["_cache"] = ChunkCache(CACHE_BYTES)
        state["_scratch"] = {}
        state["_dsets"] = {}
        state["_ram"] = {}
        return state

    def _file(self, shard: int) -> Any:
        import h5py

        if self._pid != os.getpid():  # forked: never share HDF5 handles across processes
            self._files, self._dsets, self._pid = {}, {}, os.getpid()
            self._cache = ChunkCache(CACHE_BYTES)
        f = self._files.get(shard)
        if f is None:
            path = self.directory / self.manifest.shards[shard].file
            # uncompressed chunks go straight into the destination with HDF5's chunk cache
            # off (no copy through the cache); compressed ones need it to decode once
            raw = self.manifest.compression in (None, "none")
            opts = {"rdcc_nbytes": 0} if raw else {}
            f = self._files[shard] = h5py.File(path, "r", **opts)
        return f

    def _dataset(self, shard: int, key: str) -> Any:
        """The open h5py dataset ``key`` of ``shard`` (looking it up by name costs ~80 us)."""
        f = self._file(shard)  # first: resets the handles after a fork
        ds = self._dsets.get((shard, key))
        if ds is None:
            ds = self._dsets[(shard, key)] = f[key]
        return ds

    def read_arrays(
        self, indices: np.ndarray, keys: tuple[str, ...] = ("x", "y"), *, cached: bool = False
    ) -> list[np.ndarray]:
        """Read samples ``indices`` (of this split), in that order.

        Sorted indices are read per shard with one slice per segment whose gaps are smaller
        than GAP_BYTES. With ``cached``, whole stored chunks are read instead and kept in a
        small LRU, so batches that walk a chunk in pieces (sequential or chunk-shuffled order)
        read it from disk once.
        """
        base = self.indices[indices] if self.indices is not None else np.asarray(indices)
        if self.in_memory:
            return [np.take(self._all(k), base, axis=0) for k in keys]
        order = np.argsort(base, kind="stable")
        sorted_base = base[order]
        specs = self.manifest.arrays
        outs = [np.empty((len(base), *specs[k].shape), dtype=specs[k].dtype) for k in keys]
        shard_of = np.searchsorted(self._starts, sorted_base, side="right") - 1
        local = sorted_base - self._starts[shard_of]
        if cached:
            cs = self.block_samples
            chunk_of = local // cs
            groups = segments(shard_of * (1 << 32) + chunk_of, shard_of, 0)
            for a, b in groups:
                shard, c0 = int(shard_of[a]), int(chunk_of[a]) * cs
                for out, key in zip(outs, keys, strict=True):
                    ds = self._dataset(shard, key)
                    block = self._cache.get(
                        (shard, c0, key), functools.partial(_read_slice, ds, c0, c0 + cs)
                    )
                    copy_rows(out, order[a:b], block, local[a:b] - c0)
            return outs
        max_gap = max(1, GAP_BYTES // max(1, self._sample_bytes))
        # read in sorted (file) order, straight into a buffer: the output itself when the
        # indices were already sorted, else a scratch buffer gathered into the output once
        in_order = bool(np.all(order == np.arange(len(order))))
        for out, key in zip(outs, keys, strict=True):
            dst = out if in_order else self._scratch_like(out, key)
            for a, b in segments(sorted_base, shard_of, max_gap):
                ds = self._dataset(int(shard_of[a]), key)
                lo, hi = int(local[a]), int(local[b - 1]) + 1
                if hi - lo == b - a:  # no gaps: HDF5 writes straight into the buffer
                    ds.read_direct(dst, np.s_[lo:hi], np.s_[a:b])
                else:
                    dst[a:b] = ds[lo:hi][local[a:b] - lo]
            if not in_order:
                out[order] = dst
        return outs

    def preload(self) -> None:
        """Read an ``in_memory`` dataset now (else it is read on the first batch)."""
        if self.in_memory:
            for key in self.manifest.arrays:
                self._all(key)

    def _all(self, key: str) -> np.ndarray:
        """Every sample of ``key``, read once into memory (in_memory datasets)."""
        arr = self._ram.get(key)  # (plain arrays: still valid in a forked child)
        if arr is None:
            shards = range(len(self.manifest.shards))
            parts = [np.asarray(self._dataset(i, key)[()]) for i in shards]
            arr = self._ram[key] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return arr

    def _scratch_like(self, out: np.ndarray, key: str) -> np.ndarray:
        """A reused buffer shaped like ``out`` (a fresh 16 MiB one per read costs page faults)."""
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < out.shape[0]:
            buf = self._scratch[key] = np.empty_like(out)
        return buf[: out.shape[0]]

    def read_batch(
        self, indices: np.ndarray, *, cached: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x, y) tensors for ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        x, y = self.read_arrays(idx, cached=cached)
        bad = first_bad_label(y, self._num_classes)
        if bad is not None:
            path, row = self._origin(idx[bad])
            check_labels(path, y[bad : bad + 1], self._num_classes, row)
        found = None if self.tokens is None else first_bad_token(x, self.tokens)
        if found is not None and self.tokens is not None:  # name the sample's shard and row
            i = found[0] // max(1, x[0].size)
            path, row = self._origin(idx[i])
            check_tokens(path, x[i : i + 1], self.tokens, row)
        # the training contract: float32 features, int64 labels (older shards may differ)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if y.dtype != np.int64:
            y = y.astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _origin(self, i: int) -> tuple[Path, int]:
        """The shard file and row in it of sample ``i`` (of this split)."""
        sample = int(self.indices[i] if self.indices is not None else i)
        shard = int(np.searchsorted(self._starts, sample, side="right")) - 1
        return self.directory / self.manifest.shards[shard].file, sample - int(self._starts[shard])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.read_batch(np.array([i]))
        return x[0], y[0]

    def adopt_files(self, files: dict[int, Any]) -> None:
        """Read through these already open HDF5 files (e.g. MPI-IO ones) in this process."""
        self.close()
        self._files = dict(files)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close open HDF5 files of this process."""
        self._dsets = {}
        for f in self._files.values():
            f.close()
        self._files = {}
