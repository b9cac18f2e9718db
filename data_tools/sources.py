"""Conversion sources: npy/npz arrays, CSV, image folders, scikit-learn sets, synthetic data."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

from mpitrain.data.manifest import ArraySpec
from mpitrain.data.writer import ArraySource
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.tool_io import GZIP_MAGIC, os_reason

log = logging.getLogger("data_tools")

SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer")


def from_npz(path: Path, x_key: str = "x", y_key: str = "y") -> ArraySource:
    """Arrays of an ``.npz`` file: ``x_key``/``y_key`` plus every other named array."""
    if not path.exists():
        raise DataError(with_hint(f"'{path}' does not exist", "check --npz"))
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            with_hint(f"'{path}' cannot be read as .npz: {exc}", "check --npz")
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(with_hint(f"'{path}' is a .npy file, not .npz", "use --npy X.npy Y.npy"))
    with data:
        missing = [k for k in (x_key, y_key) if k not in data.files]
        if missing:
            raise DataError(
                with_hint(
                    f"'{path}' has no array {missing[0]!r} (has: {', '.join(data.files)})",
                    "name the arrays with --x-key/--y-key",
                )
            )
        arrays = {"x": _member(data, path, x_key), "y": _member(data, path, y_key)}
        for k in data.files:
            if k not in (x_key, y_key):
                arrays[k] = _member(data, path, k)
    try:
        return ArraySource(arrays, origin=f"'{path}'")
    except DataError as exc:
        raise DataError(f"'{path}': {exc}") from None


def _member(data: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return np.asarray(data[key])
    except ValueError as exc:
        what = "Python objects (dtype object)" if "allow_pickle" in str(exc) else str(exc)
        raise DataError(
            with_hint(f"'{path}': array '{key}' holds {what}", "save plain numeric arrays")
        ) from None


def from_npy(x_path: Path, y_path: Path) -> ArraySource:
    """Two ``.npy`` files (memory-mapped, so they may exceed memory)."""
    arrays: dict[str, np.ndarray] = {}
    for key, p in (("x", x_path), ("y", y_path)):
        if not p.exists():
            raise DataError(with_hint(f"'{p}' does not exist", "check --npy X.npy Y.npy"))
        try:
            arrays[key] = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(
                with_hint(f"'{p}' cannot be read as .npy: {exc}", "check --npy X.npy Y.npy")
            ) from None
    try:
        return ArraySource(arrays, origin=f"'{x_path}' + '{y_path}'")
    except DataError as exc:
        raise DataError(f"'{x_path}' + '{y_path}': {exc}") from None


def from_csv(path: Path, label: str) -> ArraySource:
    """A CSV with a header: every column but ``label`` is a float32 feature."""
    try:
        return _read_csv(path, label)
    except UnicodeDecodeError as exc:
        gz = " (it is gzip-compressed: gunzip it first)" if exc.object[:2] == GZIP_MAGIC else ""
        raise DataError(
            with_hint(f"'{path}' is not UTF-8 text (offset {exc.start}){gz}",
                      "save it as UTF-8 CSV")
        ) from None
    except OSError as exc:
        raise DataError(with_hint(f"--csv '{path}' {os_reason(exc)}", "check --csv")) from None
    except csv.Error as exc:
        raise DataError(
            with_hint(f"'{path}' cannot be read as CSV: {exc}", "check --csv")
        ) from None


def _read_csv(path: Path, label: str) -> ArraySource:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # (-sig: a BOM is no column)
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(with_hint(f"'{path}' is empty", "give a CSV with a header row"))
        if label not in header:
            raise DataError(
                with_hint(f"'{path}' has no column '{label}'", f"columns: {', '.join(header)}")
            )
        li = header.index(label)
        xs, ys = [], []
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(
                    with_hint(
                        f"'{path}' line {lineno} has {len(row)} fields, the header {len(header)}",
                        "give every row one value per column",
                    )
                )
            try:
                xs.append([float(v) for i, v in enumerate(row) if i != li])
            except ValueError:
                bad = next(
                    (header[i], v) for i, v in enumerate(row) if i != li and not _is_float(v)
                )
                raise DataError(
                    with_hint(
                        f"'{path}' line {lineno}: column '{bad[0]}' is not numeric ({bad[1]!r})",
                        "clean the column or drop it",
                    )
                ) from None
            ys.append(row[li])
    if not ys:
        raise DataError(with_hint(f"'{path}' has a header but no rows", "add samples"))
    y = np.array(ys)
    try:
        y_arr = y.astype(np.int64)
    except ValueError:  # string labels: map to class ids in sorted order
        classes, y_arr = np.unique(y, return_inverse=True)
        log.info("labels mapped to ids: %s", dict(enumerate(classes.tolist())))
    x = np.asarray(xs, dtype=np.float64)  # float32 (and NaN checks) when converted
    return ArraySource({"x": x, "y": y_arr.astype(np.int64)}, origin=f"'{path}'")


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def from_images(folder: Path, size: int | None, on_error: str = "fail") -> ArraySource:
    """A folder with one sub-folder per class; images become float32 HxWxC in [0, 1]."""
    try:
        return _read_images(folder, size, on_error)
    except OSError as exc:  # a folder that cannot be listed (an unreadable image is handled)
        where = exc.filename or folder
        raise DataError(
            with_hint(f"'{where}' cannot be read: {exc.strerror or exc}", "check --images")
        ) from None


def _read_images(folder: Path, size: int | None, on_error: str) -> ArraySource:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataError(with_hint(f"'{folder}' has no class sub-folders", "use DIR/CLASS/img.png"))
    xs, ys = [], []
    for ci, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            try:
                with Image.open(f) as im:
                    img = im.convert("RGB")
                    if size:
                        img = img.resize((size, size))
                    xs.append(np.asarray(img, dtype=np.float32) / 255.0)
                    ys.append(ci)
            except (UnidentifiedImageError, OSError) as exc:
                if on_error == "skip":
                    log.warning("skipping unreadable image '%s': %s", f, exc)
                    continue
                raise DataError(
                    with_hint(
                        f"image '{f}' cannot be read: {exc}", "fix it or pass --on-error skip"
                    )
                ) from None
    shapes = {x.shape for x in xs}
    if not xs:
        raise DataError(with_hint(f"'{folder}' holds no readable images", "check --images"))
    if len(shapes) > 1:
        raise DataError(with_hint(f"images in '{folder}' differ in size", "pass --resize N"))
    return ArraySource({"x": np.stack(xs), "y": np.asarray(ys, dtype=np.int64)},
                       origin=f"'{folder}'")


def from_sklearn(name: str) -> ArraySource:
    """A dataset bundled with scikit-learn (no download)."""
    import sklearn.datasets as skd

    if name not in SKLEARN_SETS:
        raise DataError(with_hint(f"unknown scikit-learn set '{name}'", f"use {SKLEARN_SETS}"))
    data = getattr(skd, f"load_{name}")()
    x = data.images / 16.0 if name == "digits" else data.data
    return ArraySource(
        {"x": np.asarray(x, dtype=np.float32), "y": data.target.astype(np.int64)},
        origin=f"scikit-learn '{name}'",
    )


class SyntheticSource:
    """Seeded classification data of any size, generated block by block (never all in memory).

    Sample ``i`` depends only on (seed, i // BLOCK), so any rank can produce any range and the
    result does not depend on how the conversion is split.
    """

    BLOCK = 4096

    def __init__(self, n: int, shape: tuple[int, ...], classes: int, seed: int) -> None:
        if n < 1 or classes < 2:
            raise DataError(
                with_hint("synthetic data needs n >= 1 and >= 2 classes", "check flags")
            )
        self.num_samples = n
        self.shape = shape
        self.classes = classes
        self.seed = seed
        dim = math.prod(shape)
        self.centers = np.random.default_rng([seed, 0xC0FFEE]).normal(0, 1, (classes, dim))

    def specs(self) -> dict[str, ArraySpec]:
        """Per-sample shapes and dtypes."""
        return {"x": ArraySpec(self.shape, "float32"), "y": ArraySpec((), "int64")}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, b])
        n = min(self.BLOCK, self.num_samples - b * self.BLOCK)
        y = rng.integers(0, self.classes, n)
        x = self.centers[y] + rng.normal(0, 2.0, (n, self.centers.shape[1]))
        return x.astype(np.float32).reshape(n, *self.shape), y.astype(np.int64)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Generate samples ``[start, stop)``."""
        xs, ys = [], []
        for b in range(start // self.BLOCK, (stop - 1) // self.BLOCK + 1):
            x, y = self._block(b)
            lo = max(start - b * self.BLOCK, 0)
            hi = min(stop - b * self.BLOCK, len(y))
            xs.append(x[lo:hi])
            ys.append(y[lo:hi])
        return {"x": np.concatenate(xs), "y": np.concatenate(ys)}
