"""The shard schema: ``manifest.json`` beside ``NAME-00000.h5`` shards, shared with data_tools.

Every field is checked for type and range when read (booleans are not integers, NaN and
Infinity are not numbers, duplicate keys and entries are refused), so a bad manifest is one
DataError naming the file and the field, never a traceback deeper in.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np

from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.files import name_problem

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: the lock file held while a manifest is switched (see write_manifest)
LOCK = f".{MANIFEST}.lock"
CONVERT_HINT = "create it with: python -m data_tools convert ... --out DIR"
NAME_HINT = "use a plain name such as 'train' or 'mnist_v2' (no '/', no leading '.')"
#: limits that keep sizes far from overflow
MAX_SAMPLES = 1 << 48
MAX_DIM = (1 << 31) - 1
MAX_SAMPLE_BYTES = 1 << 34
MAX_MANIFEST_BYTES = 1 << 30
#: numpy dtype kinds an array may have (bool, signed, unsigned, float); labels: integers
ARRAY_KINDS = "biuf"
LABEL_KINDS = "iu"
COMPRESSIONS = ("lzf", "gzip")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ArraySpec:
    """Per-sample shape and dtype of one named array (``x``, ``y`` or an extra one)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample of this array."""
        return int(np.dtype(self.dtype).itemsize) * math.prod(self.shape)


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: its name relative to the dataset directory, samples and checksum."""

    file: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class SplitEntry:
    """A named split: sorted, unique sample indices in a ``.npy`` file beside the manifest."""

    file: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a dataset directory holds."""

    name: str
    num_samples: int
    arrays: dict[str, ArraySpec]
    shards: list[ShardEntry]
    chunk_samples: int
    compression: str | None = None
    num_classes: int | None = None
    class_counts: dict[str, int] = field(default_factory=dict)
    splits: dict[str, SplitEntry] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        """Serialise (stable key order, for byte-identical manifests)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample over all arrays."""
        return sum(a.sample_bytes for a in self.arrays.values())

    @property
    def classes(self) -> int:
        """Number of classes: ``num_classes``, else the largest counted label + 1."""
        if self.num_classes is not None:
            return self.num_classes
        return max(int(k) for k in self.class_counts) + 1


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a plain file-name prefix, else raise DataError naming ``what``."""
    problem = name_problem(value)
    if problem:
        raise DataError(with_hint(f"{what} {_show(value)} {problem}", NAME_HINT))
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def safe_member(directory: Path, name: str, what: str) -> Path:
    """Return ``directory/name``, rejecting absolute paths and anything outside ``directory``."""
    pure = PurePosixPath(name)
    if (
        pure.is_absolute()
        or ".." in pure.parts
        or not name
        or "\\" in name
        or _CONTROL.search(name)
    ):
        raise DataError(
            with_hint(
                f"manifest '{directory / MANIFEST}': {what} {_show(name)} points outside the "
                "dataset",
                "entries must be plain file names inside the dataset directory",
            )
        )
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise DataError(
            with_hint(
                f"manifest '{directory / MANIFEST}': {what} '{name}' resolves outside the dataset",
                "remove the symlink or re-create the dataset",
            )
        )
    return path


class _Reader:
    """Typed access to the parsed JSON, failing with the manifest path and the field's key."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, key: str, problem: str, hint: str = CONVERT_HINT) -> NoReturn:
        raise DataError(with_hint(f"manifest '{self.where}': field '{key}' {problem}", hint))

    def as_obj(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a JSON object, got {_kind(value)}")
        return value

    def as_list(self, value: object, key: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(key, f"must be a JSON list, got {_kind(value)}")
        return value

    def as_str(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_kind(value)} {_show(value)}")
        return value

    def as_int(self, value: object, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_kind(value)} {_show(value)}")
        if not lo <= value <= hi:
            self.fail(key, f"must be in [{lo}, {hi}], got {value}")
        return value

    def member(self, value: object, key: str) -> str:
        name = self.as_str(value, key)
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
            self.fail(key, f"{_show(name)} points outside the dataset",
                      "entries must be plain file names inside the dataset directory")
        if _CONTROL.search(name):
            self.fail(key, f"{_show(name)} contains a control character")
        return name

    def sha(self, value: object, key: str) -> str:
        text = self.as_str(value, key)
        if not _SHA.match(text):
            self.fail(key, f"must be 64 lowercase hex digits, got {_show(text)}")
        return text

    def keys(self, raw: dict[str, Any], key: str, required: set[str], allowed: set[str]) -> None:
        for k in sorted(set(raw) - allowed):
            self.fail(f"{key}.{k}" if key else k, "is not a known field",
                      "remove it, or upgrade mpitrain if a newer data_tools wrote it")
        for k in sorted(required - set(raw)):
            self.fail(f"{key}.{k}" if key else k, "is missing")


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def _parse_array(r: _Reader, key: str, raw: object) -> ArraySpec:
    spec = r.as_obj(raw, key)
    r.keys(spec, key, {"shape", "dtype"}, {"shape", "dtype"})
    dims = r.as_list(spec["shape"], f"{key}.shape")
    shape = tuple(r.as_int(d, f"{key}.shape", 1, MAX_DIM) for d in dims)
    dtype = r.as_str(spec["dtype"], f"{key}.dtype")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        r.fail(f"{key}.dtype", f"{_show(dtype)} is not a numpy dtype")
    if np_dtype.kind not in ARRAY_KINDS or str(np_dtype) != dtype:
        r.fail(f"{key}.dtype", f"{_show(dtype)} is not a plain numeric dtype such as 'float32'")
    if np_dtype.itemsize * math.prod(shape) > MAX_SAMPLE_BYTES:
        r.fail(key, f"declares {math.prod(shape)} elements per sample, more than any sample holds")
    return ArraySpec(shape, dtype)


def _parse_entry(r: _Reader, key: str, raw: object, lo: int) -> tuple[str, int, str]:
    entry = r.as_obj(raw, key)
    names = {"file", "num_samples", "sha256"}
    r.keys(entry, key, names, names)
    return (
        r.member(entry["file"], f"{key}.file"),
        r.as_int(entry["num_samples"], f"{key}.num_samples", lo, MAX_SAMPLES),
        r.sha(entry["sha256"], f"{key}.sha256"),
    )


def _parse_classes(r: _Reader, raw: dict[str, Any], num_classes: int | None) -> dict[str, int]:
    counts = r.as_obj(raw.get("class_counts", {}), "class_counts")
    out: dict[str, int] = {}
    for k, v in counts.items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,9}", k):
            r.fail("class_counts", f"has key {_show(k)}, not a class id such as 0, 1 or 2")
        if num_classes is not None and int(k) >= num_classes:
            r.fail("class_counts", f"counts class {k}, but num_classes is {num_classes}")
        out[k] = r.as_int(v, f"class_counts.{k}", 0, MAX_SAMPLES)
    return out


def _parse(raw: dict[str, Any], r: _Reader) -> Manifest:
    if "schema_version" not in raw:
        r.fail("schema_version", "is missing")
    version = r.as_int(raw["schema_version"], "schema_version", 0, 1 << 31)
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        r.fail("schema_version", f"is {version}; this mpitrain reads version {SCHEMA_VERSION}",
               "upgrade mpitrain" if newer else "re-create the dataset with data_tools")
    allowed = {f.name for f in fields(Manifest)}
    r.keys(raw, "", {"name", "num_samples", "arrays", "shards", "chunk_samples"}, allowed)
    arrays_raw = r.as_obj(raw["arrays"], "arrays")
    arrays = {}
    for k, v in arrays_raw.items():
        if name_problem(k):
            r.fail("arrays", f"has array name {_show(k)} that {name_problem(k)}")
        arrays[k] = _parse_array(r, f"arrays.{k}", v)
    for k in ("x", "y"):
        if k not in arrays:
            r.fail("arrays", f"declares no array '{k}'")
    if arrays["y"].shape != () or np.dtype(arrays["y"].dtype).kind not in LABEL_KINDS:
        r.fail("arrays.y", f"must hold one integer class label per sample, got shape "
               f"{list(arrays['y'].shape)} {arrays['y'].dtype}",
               "re-convert: data_tools stores labels as int64")
    shards = [
        ShardEntry(*_parse_entry(r, f"shards[{i}]", s, 1))
        for i, s in enumerate(r.as_list(raw["shards"], "shards"))
    ]
    num_classes = None
    if raw.get("num_classes") is not None:
        num_classes = r.as_int(raw["num_classes"], "num_classes", 1, MAX_DIM)
    splits = {}
    for k, v in r.as_obj(raw.get("splits", {}), "splits").items():
        if name_problem(k):
            r.fail("splits", f"has split name {_show(k)} that {name_problem(k)}")
        splits[k] = SplitEntry(*_parse_entry(r, f"splits.{k}", v, 0))
    compression = raw.get("compression")
    if compression is not None and compression not in COMPRESSIONS:
        r.fail("compression", f"is {_show(compression)}; known: null, {', '.join(COMPRESSIONS)}")
    return Manifest(
        name=r.as_str(raw["name"], "name"),
        num_samples=r.as_int(raw["num_samples"], "num_samples", 1, MAX_SAMPLES),
        arrays=arrays,
        shards=shards,
        chunk_samples=r.as_int(raw["chunk_samples"], "chunk_samples", 1, MAX_SAMPLES),
        compression=compression,
        num_classes=num_classes,
        class_counts=_parse_classes(r, raw, num_classes),
        splits=splits,
        params=r.as_obj(raw.get("params", {}), "params"),
        schema_version=version,
    )


def _check_totals(m: Manifest, r: _Reader) -> None:
    if not m.shards:
        r.fail("shards", "is empty", "convert a source with samples")
    if sum(s.num_samples for s in m.shards) != m.num_samples:
        r.fail("shards", f"sample counts do not add up to num_samples {m.num_samples}")
    seen: set[str] = set()
    for i, s in enumerate(m.shards):
        if s.file in seen:
            r.fail(f"shards[{i}].file", f"is a duplicate shard entry '{s.file}'")
        seen.add(s.file)
    for k, sp in m.splits.items():
        if sp.num_samples > m.num_samples:
            r.fail(f"splits.{k}.num_samples", f"is {sp.num_samples}, more than the dataset's "
                   f"{m.num_samples} samples")
    if m.class_counts and sum(m.class_counts.values()) != m.num_samples:
        r.fail("class_counts", f"sum to {sum(m.class_counts.values())}, not num_samples "
               f"{m.num_samples}")
    if m.num_classes is None and not m.class_counts:
        r.fail("num_classes", "is missing and there are no class_counts to derive it from")


class _Constant(ValueError):
    pass


def _no_constant(name: str) -> NoReturn:
    raise _Constant(name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Constant(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_manifest_bytes(data: bytes, path: Path) -> Manifest:
    """Decode and validate the bytes of a manifest file read from ``path``."""
    hint = "re-create the dataset with data_tools"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(with_hint(
            f"'{path}' is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})",
            hint)) from None
    try:
        raw = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except _Constant as exc:
        what = str(exc) if str(exc).startswith("duplicate") else f"the number {exc}"
        raise DataError(with_hint(f"'{path}' holds {what}, which a manifest never has",
                                  hint)) from None
    except json.JSONDecodeError as exc:
        raise DataError(with_hint(f"'{path}' is not valid JSON ({exc})", hint)) from None
    except RecursionError:
        raise DataError(with_hint(f"'{path}' is nested too deeply to be a manifest",
                                  hint)) from None
    if not isinstance(raw, dict):
        raise DataError(with_hint(f"'{path}' does not hold a JSON object", CONVERT_HINT))
    r = _Reader(path)
    m = _parse(raw, r)
    _check_totals(m, r)
    return m


def read_manifest(directory: str | Path) -> tuple[Manifest, bytes]:
    """Read and validate ``directory/manifest.json``; return it and the bytes it was read from."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(with_hint(f"dataset directory '{d}' does not exist", CONVERT_HINT))
    path = d / MANIFEST
    if not path.exists():
        raise DataError(with_hint(f"'{d}' has no {MANIFEST}", CONVERT_HINT))
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DataError(with_hint(f"'{path}' is larger than any manifest", CONVERT_HINT))
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            with_hint(f"'{path}' cannot be read: {exc.strerror or exc}", "check its permissions")
        ) from None
    m = parse_manifest_bytes(data, path)
    for s in m.shards:
        safe_member(d, s.file, "shard")
    for name, sp in m.splits.items():
        safe_member(d, sp.file, f"split '{name}'")
    return m, data


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``directory/manifest.json`` (types, ranges, paths, counts)."""
    return read_manifest(directory)[0]


def write_manifest(directory: Path, manifest: Manifest, *, expect: bytes | None = None) -> None:
    """Write ``manifest.json`` atomically (temporary name, fsync, rename).

    With ``expect``, the switch is a compare-and-swap: it happens only while the file still
    holds exactly those bytes, under a short-lived lock file against a concurrent switch.

    Raises:
        DataError: the write failed (naming the file and the space needed), or the manifest
            changed since ``expect`` was read.
    """
    from mpitrain.runtime.files import write_atomic, write_failure

    path = directory / MANIFEST
    data = manifest.to_json().encode()
    lock = directory / LOCK
    if expect is not None:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise DataError(with_hint(
                f"'{path}' is being switched by another data_tools (lock file '{lock}')",
                "wait and re-run; if no data_tools runs there, remove the lock file")) from None
        os.close(fd)
    try:
        if expect is not None and path.read_bytes() != expect:
            raise DataError(with_hint(
                f"'{path}' changed while this command ran (another split or conversion wrote "
                "it); the other writer's manifest is kept", "re-run the command"))
        write_atomic(path, data)
    except OSError as exc:
        raise DataError(with_hint(write_failure(path, exc, len(data)),
                                  "free some space (or fix permissions) and re-run")) from None
    finally:
        if expect is not None:
            os.unlink(lock)

