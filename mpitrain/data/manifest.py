"""The shard schema: ``manifest.json`` beside ``NAME-00000.h5`` shards, shared with data_tools."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mpitrain.errors import DataError, with_hint

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONVERT_HINT = "create it with: python -m data_tools convert ... --out DIR"


@dataclass(frozen=True)
class ArraySpec:
    """Per-sample shape and dtype of one named array (``x``, ``y`` or an extra one)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: its name relative to the dataset directory, samples and checksum."""

    file: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class SplitEntry:
    """A named split: sorted sample indices stored in a ``.npy`` file beside the manifest."""

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
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def safe_member(directory: Path, name: str, what: str) -> Path:
    """Return ``directory/name``, rejecting absolute paths and anything outside ``directory``."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not name or "\\" in name:
        raise DataError(
            with_hint(
                f"manifest '{directory / MANIFEST}': {what} '{name}' points outside the dataset",
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


def _parse(raw: dict[str, Any], where: Path) -> Manifest:
    try:
        version = int(raw["schema_version"])
        if version > SCHEMA_VERSION:
            raise DataError(
                with_hint(
                    f"'{where}' has schema version {version}, newer than {SCHEMA_VERSION}",
                    "upgrade mpitrain",
                )
            )
        arrays = {
            k: ArraySpec(tuple(v["shape"]), str(v["dtype"])) for k, v in raw["arrays"].items()
        }
        shards = [
            ShardEntry(str(s["file"]), int(s["num_samples"]), str(s["sha256"]))
            for s in raw["shards"]
        ]
        splits = {
            k: SplitEntry(str(v["file"]), int(v["num_samples"]), str(v["sha256"]))
            for k, v in raw.get("splits", {}).items()
        }
        return Manifest(
            name=str(raw["name"]),
            num_samples=int(raw["num_samples"]),
            arrays=arrays,
            shards=shards,
            chunk_samples=int(raw["chunk_samples"]),
            compression=raw.get("compression"),
            num_classes=raw.get("num_classes"),
            class_counts={str(k): int(v) for k, v in raw.get("class_counts", {}).items()},
            splits=splits,
            params=dict(raw.get("params", {})),
            schema_version=version,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            with_hint(f"manifest '{where}' is missing or has a bad field: {exc}", CONVERT_HINT)
        ) from None


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``directory/manifest.json`` (paths, counts, required arrays)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(with_hint(f"dataset directory '{d}' does not exist", CONVERT_HINT))
    path = d / MANIFEST
    if not path.exists():
        raise DataError(with_hint(f"'{d}' has no {MANIFEST}", CONVERT_HINT))
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            with_hint(
                f"'{path}' is not valid JSON ({exc})", "re-create the dataset with data_tools"
            )
        ) from None
    if not isinstance(raw, dict):
        raise DataError(with_hint(f"'{path}' does not hold a JSON object", CONVERT_HINT))
    m = _parse(raw, path)
    for key in ("x", "y"):
        if key not in m.arrays:
            raise DataError(with_hint(f"manifest '{path}' declares no array '{key}'", CONVERT_HINT))
    if m.num_samples <= 0 or not m.shards:
        raise DataError(with_hint(f"dataset '{d}' is empty", "convert a source with samples"))
    if sum(s.num_samples for s in m.shards) != m.num_samples:
        raise DataError(
            with_hint(f"manifest '{path}': shard sample counts do not add up", CONVERT_HINT)
        )
    for s in m.shards:
        safe_member(d, s.file, "shard")
    for name, sp in m.splits.items():
        safe_member(d, sp.file, f"split '{name}'")
    return m


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temporary name, fsync, rename)."""
    from mpitrain.runtime.files import write_atomic

    write_atomic(directory / MANIFEST, manifest.to_json().encode())
