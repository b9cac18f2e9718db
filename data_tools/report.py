"""`inspect` (a human summary) and `verify` (checksums, shapes, dtypes, readable chunks)."""

from __future__ import annotations

from pathlib import Path

from mpitrain.data.dataset import check_shard
from mpitrain.data.manifest import load_manifest, safe_member
from mpitrain.errors import DataError


def inspect(directory: Path) -> str:
    """Return a summary: counts, shapes, dtypes, class balance, splits, on-disk size."""
    m = load_manifest(directory)
    size = sum(
        (directory / s.file).stat().st_size for s in m.shards if (directory / s.file).exists()
    )
    lines = [
        f"dataset '{m.name}' in {directory} (schema v{m.schema_version})",
        f"  samples: {m.num_samples} in {len(m.shards)} shards, chunk {m.chunk_samples} samples, "
        f"compression {m.compression or 'none'}, {size / 2**20:.1f} MiB on disk",
    ]
    for key, spec in m.arrays.items():
        lines.append(f"  array {key}: per-sample shape {spec.shape}, {spec.dtype}")
    if m.class_counts:
        total = sum(m.class_counts.values())
        balance = ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in m.class_counts.items())
        lines.append(f"  classes ({m.num_classes}): {balance}")
    for name, sp in m.splits.items():
        lines.append(f"  split {name}: {sp.num_samples} samples ({sp.file})")
    return "\n".join(lines)


def read_all_chunks(path: Path, chunk: int) -> None:
    """Read every dataset of an HDF5 file in chunk-sized slices (decompresses every chunk)."""
    import h5py

    with h5py.File(path, "r") as f:
        for key in f:
            ds = f[key]
            for start in range(0, ds.shape[0], max(1, chunk)):
                ds[start : start + chunk]


def verify(directory: Path) -> list[str]:
    """Return one problem line per bad shard or split (empty when all is well)."""
    m = load_manifest(directory)
    problems = []
    for i, entry in enumerate(m.shards):
        try:
            check_shard(directory, m, i, checksum=True)
            read_all_chunks(directory / entry.file, m.chunk_samples)
        except DataError as exc:
            problems.append(str(exc))
        except (OSError, RuntimeError) as exc:
            problems.append(f"shard '{entry.file}': unreadable chunk: {exc}")
    for name, sp in m.splits.items():
        from mpitrain.data.dataset import file_sha256

        path = safe_member(directory, sp.file, f"split '{name}'")
        if not path.exists() or file_sha256(path) != sp.sha256:
            problems.append(f"split '{name}' file '{sp.file}' is missing or fails its checksum")
    return problems
