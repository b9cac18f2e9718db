"""Reading: strategies for sorted sample indices (coalesced runs, or cached whole chunks), and
the checks applied to what is read before it is trusted (a shard's HDF5 layout, a split file,
labels, token ids, and a conversion source's dtypes and values)."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mpitrain.data.manifest import ArraySpec, Manifest
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.files import name_problem

#: a gap up to this many bytes between wanted samples is read through rather than skipped
GAP_BYTES = 256 * 1024
TOKEN_HINT = ("token windows hold integer ids 0 .. {top}: write them with python -m data_tools "
              "corpus, or convert with --vocab {vocab}")


def copy_rows(out: np.ndarray, dest: np.ndarray, block: np.ndarray, rows: np.ndarray) -> None:
    """``out[dest] = block[rows]``, as one slice copy when both sides are contiguous."""
    n = len(rows)
    if n and rows[-1] - rows[0] == n - 1 and dest[-1] - dest[0] == n - 1:
        if n == 1 or (np.all(np.diff(rows) == 1) and np.all(np.diff(dest) == 1)):
            out[dest[0] : dest[0] + n] = block[rows[0] : rows[0] + n]
            return
    out[dest] = block[rows]


class ChunkCache:
    """A byte-bounded LRU of decoded chunk blocks (one stored chunk is read once while hot)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._blocks: OrderedDict[Any, np.ndarray] = OrderedDict()

    def get(self, key: Any, load: Callable[[], np.ndarray]) -> np.ndarray:
        """Return the block for ``key``, loading (and caching) it on a miss."""
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
            return block
        block = load()
        self._blocks[key] = block
        self.size += block.nbytes
        while self.size > self.capacity and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self.size -= old.nbytes
        return block


def segments(sorted_base: np.ndarray, shard_of: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Split sorted indices into [a, b) segments: one shard, gaps of at most ``max_gap``."""
    breaks = np.flatnonzero((np.diff(sorted_base) > max_gap) | (np.diff(shard_of) != 0)) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_base)]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if a < b]


# -- checks on what a reader is about to trust (HDF5 layout, split indices, labels) --


def hdf5_problem(f: Any, keys: Iterable[str]) -> tuple[str, str] | None:
    """Return (key, why) for the first feature of open HDF5 file ``f`` that could reach
    outside it or read as something it is not: external links anywhere at the top level;
    for the arrays ``keys``: soft links, groups, virtual datasets, external raw storage,
    chunks never written. None when the file is plain."""
    import h5py

    for name in f:
        if isinstance(f.get(name, getlink=True), h5py.ExternalLink):
            return name, "is an external link to another file"
    for key in keys:
        link = f.get(key, getlink=True)
        if link is None:
            return key, "is missing"
        if isinstance(link, h5py.SoftLink):
            return key, f"is a soft link (to '{link.path}'), not a dataset"
        obj = f[key]
        if not isinstance(obj, h5py.Dataset):
            return key, "is a group, not a dataset"
        if obj.is_virtual:
            return key, "is a virtual dataset (it reads other files)"
        if obj.external:
            return key, "keeps its data in external raw files"
        missing = unallocated(obj)
        if missing:
            return key, missing
    return None


def unallocated(ds: Any) -> str | None:
    """Why dataset ``ds`` does not hold all its data on disk (None when it does)."""
    nbytes = int(ds.size) * ds.dtype.itemsize
    if ds.chunks is None:
        stored = int(ds.id.get_storage_size())
        return None if stored >= nbytes else f"has {stored} of {nbytes} bytes allocated"
    want = math.prod(-(-s // c) for s, c in zip(ds.shape, ds.chunks, strict=True))
    have = int(ds.id.get_num_chunks())
    return None if have >= want else f"has only {have} of its {want} chunks allocated"


def index_problem(idx: Any, n: int, count: int) -> str | None:
    """Why ``idx`` is not a valid split index array over ``n`` samples with ``count`` entries."""
    if not isinstance(idx, np.ndarray):
        return "does not hold an array"
    if idx.dtype.kind not in "iu":
        return f"holds {idx.dtype} values, not integer sample indices"
    if idx.ndim != 1:
        return f"is {idx.ndim}-D, not a 1-D list of sample indices"
    if len(idx) != count:
        return f"holds {len(idx)} indices, the manifest says {count}"
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if len(bad):
        i = int(bad[0])
        return f"has index {int(idx[i])} at position {i}, outside [0, {n})"
    step = np.flatnonzero(np.diff(idx) <= 0)
    if len(step):
        i = int(step[0]) + 1
        return (f"is not sorted and unique at position {i} ({int(idx[i])} after "
                f"{int(idx[i - 1])})")
    return None


def first_bad_label(y: np.ndarray, num_classes: int) -> int | None:
    """Position of the first label outside ``[0, num_classes)`` (None when all are inside)."""
    if not len(y) or (int(y.min()) >= 0 and int(y.max()) < num_classes):
        return None
    return int(np.flatnonzero((y < 0) | (y >= num_classes))[0])


def first_bad_token(x: np.ndarray, vocab: int) -> tuple[int, str] | None:
    """Flat position in ``x`` of the first value that is not a token id (an integer in
    ``[0, vocab)``) and why; None when every value is one."""
    if not x.size:
        return None
    if x.dtype.kind == "b":
        x = x.view(np.uint8)
    flat = x.reshape(-1)
    if x.dtype.kind in "iu":
        if x.dtype.kind == "u" and x.dtype.itemsize < 8 and 1 << (8 * x.dtype.itemsize) <= vocab:
            return None  # every value of the dtype is an id
        if int(flat.min()) >= 0 and int(flat.max()) < vocab:
            return None
        i = int(np.flatnonzero((flat < 0) | (flat >= vocab))[0])
        return i, "is negative" if flat[i] < 0 else f"is not below the vocabulary size {vocab}"
    with np.errstate(invalid="ignore"):
        lo, hi = flat.min(), flat.max()  # NaN propagates: then the slow path names it
        if lo >= 0 and hi < vocab and bool((flat == np.floor(flat)).all()):
            return None
        finite = np.isfinite(flat)
        bad = ~finite | (flat != np.floor(flat)) | (flat < 0) | (flat >= vocab)
    i = int(np.flatnonzero(bad)[0])
    v = float(flat[i])
    if not finite[i]:
        return i, "is not a finite number"
    if v != np.floor(v):
        return i, "is not an integer"
    return i, "is negative" if v < 0 else f"is not below the vocabulary size {vocab}"


def token_problem(x: np.ndarray, vocab: int, first_row: int) -> str | None:
    """Why ``x`` (samples from row ``first_row`` on) is not token ids in ``[0, vocab)``, naming
    the value, the sample and the position in it; None when it is."""
    found = first_bad_token(x, vocab)
    if found is None:
        return None
    i, why = found
    row, *pos = (int(k) for k in np.unravel_index(i, x.shape))
    value = x.reshape(-1)[i].item()
    where = f"position {pos[0]}" if len(pos) == 1 else f"position {tuple(pos)}"
    return (f"holds {value!r} at sample {first_row + row}, {where}: it {why}, so it is "
            f"not a token id in [0, {vocab})")


def check_tokens(path: Path, x: np.ndarray, vocab: int, offset: int) -> None:
    """Raise DataError naming shard ``path``, the sample (``offset`` + row), the position and
    the value if ``x`` holds anything but token ids in ``[0, vocab)``."""
    problem = token_problem(x, vocab, offset)
    if problem:
        raise DataError(with_hint(f"shard '{path}' dataset 'x' {problem}",
                                  TOKEN_HINT.format(top=vocab - 1, vocab=vocab)))


def check_declared_vocab(directory: Path, manifest: Manifest, vocab: int) -> None:
    """Raise DataError when the manifest declares token ids beyond ``vocab`` (data_tools
    convert --vocab records its vocabulary in the manifest's params)."""
    declared = manifest.params.get("vocab")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > vocab:
        raise DataError(with_hint(
            f"dataset '{directory}' holds token ids of a {declared}-token vocabulary "
            f"(manifest params.vocab); this model embeds {vocab} token ids",
            TOKEN_HINT.format(top=vocab - 1, vocab=vocab)))


def check_labels(path: Path, y: np.ndarray, num_classes: int, offset: int) -> None:
    """Raise DataError naming shard ``path`` if a label of ``y`` is outside [0, num_classes)."""
    bad = first_bad_label(y, num_classes)
    if bad is not None:
        raise DataError(
            with_hint(
                f"shard '{path}' dataset 'y' holds label {int(y[bad])} at row {offset + bad}, "
                f"outside [0, {num_classes})",
                "fix the labels and re-convert (or convert with --classes N)",
            )
        )


def token_dtype(vocab: int) -> str:
    """The smallest integer dtype that holds every token id below ``vocab``."""
    for dtype in ("uint8", "uint16", "int32"):
        if vocab - 1 <= np.iinfo(dtype).max:
            return dtype
    return "int64"


class Source(Protocol):
    """What a converter reads from: a sample count, specs, and contiguous sample ranges."""

    num_samples: int

    def specs(self) -> dict[str, ArraySpec]: ...

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]: ...


class CheckedSource:
    """A source seen through the training contract: float32 features, int64 labels.

    Decided from the dtypes before anything is written (and listed in ``notes``): features of
    any real dtype become float32, labels of an integer, boolean or integral float dtype
    become int64, extra arrays are kept as they are. Refused at once: arrays that are not
    real numbers, labels that are not one value per sample, names that are not plain. Refused
    as each block is read, naming the value and the sample index: NaN or infinite features
    (or float64 ones too large for float32), and labels that are NaN, fractional, negative
    or not below ``num_classes``. With ``vocab`` the features are token ids instead: every
    value must be an integer in ``[0, vocab)`` (refused naming the value and index), and they
    are stored in the smallest integer dtype that holds them.
    """

    def __init__(
        self, source: Source, num_classes: int | None = None, vocab: int | None = None
    ) -> None:
        self.source = source
        self.num_samples = source.num_samples
        self.num_classes = num_classes
        self.vocab = vocab
        self.origin = str(getattr(source, "origin", "the source"))
        self.notes: list[str] = []
        self._specs: dict[str, ArraySpec] = {}
        if num_classes is not None and num_classes < 1:
            self._refuse(f"num_classes must be >= 1, got {num_classes}", "e.g. --classes 10")
        if vocab is not None and vocab < 1:
            self._refuse(f"vocab must be >= 1, got {vocab}", "e.g. --vocab 256")
        for key, spec in source.specs().items():
            self._specs[key] = ArraySpec(spec.shape, self._target(key, spec))
            if self._specs[key].dtype != spec.dtype:
                self.notes.append(f"{key}: {spec.dtype} -> {self._specs[key].dtype}")

    def _refuse(self, message: str, hint: str) -> None:
        raise DataError(with_hint(f"{self.origin}: {message}", hint))

    def _target(self, key: str, spec: ArraySpec) -> str:
        problem = name_problem(key)
        if problem:
            self._refuse(f"array name {key!r} {problem}", "rename the array")
        kind = np.dtype(spec.dtype).kind
        if kind not in "biuf":
            what = "Python objects" if kind == "O" else "values that are not real numbers"
            self._refuse(f"array '{key}' holds {what} (dtype {spec.dtype})",
                         "convert it to numbers first (labels: class ids 0, 1, 2 ...)")
        if any(d < 1 for d in spec.shape):
            self._refuse(f"array '{key}' has an empty per-sample shape {spec.shape}",
                         "drop the array")
        if key == "y":
            if spec.shape != ():
                shape = (self.num_samples, *spec.shape)
                self._refuse(f"array 'y' has shape {shape}; labels must be one class id per "
                             "sample", "pass 1-D integer labels (argmax one-hot labels first)")
            return "int64"
        if key == "x":
            return "float32" if self.vocab is None else token_dtype(self.vocab)
        return spec.dtype

    def specs(self) -> dict[str, ArraySpec]:
        """Per-sample shapes and the dtypes written."""
        return dict(self._specs)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``[start, stop)``, converted and checked (DataError names a bad value)."""
        part = self.source.read(start, stop)
        out = dict(part)
        if self.vocab is None:
            out["x"] = self._features(part["x"], start)
        else:
            out["x"] = self._tokens(part["x"], start, self.vocab)
        out["y"] = self._labels(part["y"], start)
        return out

    def _bad(self, key: str, arr: np.ndarray, mask: np.ndarray, start: int, why: str) -> None:
        pos = tuple(int(p) for p in np.argwhere(mask)[0])
        value = arr[pos].item()
        hint = ("drop or repair those samples before converting" if key == "x" else
                "labels must be class ids 0 .. num_classes-1 (convert with --classes N)")
        self._refuse(f"{'value' if key == 'x' else 'label'} {value!r} at index {start + pos[0]} "
                     f"of array '{key}' {why}", hint)

    def _features(self, x: np.ndarray, start: int) -> np.ndarray:
        if x.dtype.kind != "f":
            return x.astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            self._bad("x", x, ~finite, start, "is not a finite number")
        if x.dtype == np.float32:
            return x
        with np.errstate(over="ignore"):
            cast = x.astype(np.float32)
        overflow = ~np.isfinite(cast)
        if overflow.any():
            self._bad("x", x, overflow, start, "does not fit float32")
        return cast

    def _tokens(self, x: np.ndarray, start: int, vocab: int) -> np.ndarray:
        problem = token_problem(x, vocab, start)
        if problem:
            self._refuse(f"array 'x' (token ids) {problem}",
                         f"token ids must be integers 0 .. {vocab - 1} (or raise --vocab)")
        return x.astype(token_dtype(vocab))

    def _labels(self, y: np.ndarray, start: int) -> np.ndarray:
        if y.dtype.kind == "f":
            finite = np.isfinite(y)
            if not finite.all():
                self._bad("y", y, ~finite, start, "is not a number")
            frac = y != np.floor(y)
            if frac.any():
                self._bad("y", y, frac, start, "is not an integer")
        if y.dtype.kind == "u" and y.dtype.itemsize == 8:
            big = y > np.iinfo(np.int64).max
            if big.any():
                self._bad("y", y, big, start, "is too large")
        labels = y.astype(np.int64)
        if (labels < 0).any():
            self._bad("y", labels, labels < 0, start, "is negative")
        if self.num_classes is not None and (labels >= self.num_classes).any():
            self._bad("y", labels, labels >= self.num_classes, start,
                      f"is outside [0, {self.num_classes}) (num_classes {self.num_classes})")
        return labels

