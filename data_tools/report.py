"""`inspect` (a human summary) and `verify` (checksums, shapes, dtypes, labels, readable chunks)."""

from __future__ import annotations

from pathlib import Path

from mpitrain.data.dataset import check_shard, file_sha256, load_split
from mpitrain.data.manifest import Manifest, load_manifest, safe_member
from mpitrain.data.tokens import extra_files, tokenizer_of
from mpitrain.errors import DataError


def inspect(directory: Path) -> str:
    """Return a summary: counts, shapes, dtypes, class balance, splits, on-disk size."""
    m = load_manifest(directory)
    size = 0
    for s in m.shards:
        try:
            size += (directory / s.file).stat().st_size
        except OSError:
            pass  # a missing shard is verify's business; the summary still prints
    lines = [
        f"dataset '{m.name}' in {directory} (schema v{m.schema_version})",
        f"  samples: {m.num_samples} in {len(m.shards)} shards, chunk {m.chunk_samples} samples, "
        f"compression {m.compression or 'none'}, {size / 2**20:.1f} MiB on disk",
    ]
    for key, spec in m.arrays.items():
        lines.append(f"  array {key}: per-sample shape {spec.shape}, {spec.dtype}")
    if m.params.get("vocab") is not None:
        lines.append(f"  tokens: x holds token ids in [0, {m.params['vocab']})")
    tok = tokenizer_of(m)
    if tok is not None:
        where = f", {tok['file']} (sha256 {str(tok.get('sha256'))[:12]})" if tok.get("file") else ""
        lines.append(f"  tokenizer: {tok.get('kind')}, {tok.get('vocab_size')} tokens{where}")
    if m.params.get("converted"):
        lines.append(f"  converted: {m.params['converted']}")
    if m.class_counts:
        total = sum(m.class_counts.values())
        balance = ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in m.class_counts.items())
        lines.append(f"  classes ({m.classes}): {balance}")
    for name, sp in m.splits.items():
        lines.append(f"  split {name}: {sp.num_samples} samples ({sp.file})")
    return "\n".join(lines)


def read_all_chunks(path: Path, manifest: Manifest) -> None:
    """Read the manifest's arrays of an HDF5 file in chunk-sized slices (decodes every chunk).

    Only the arrays the manifest names are read: anything else in the file is never followed.
    """
    import h5py

    chunk = max(1, manifest.chunk_samples)
    with h5py.File(path, "r") as f:
        for key in manifest.arrays:
            ds = f[key]
            for start in range(0, ds.shape[0], chunk):
                ds[start : start + chunk]


def verify(directory: Path) -> list[str]:
    """Return one problem line per bad shard or split (empty when all is well)."""
    m = load_manifest(directory)
    problems = []
    vocab = m.params.get("vocab")  # token data (convert --vocab): every id is checked too
    tokens = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    for i, entry in enumerate(m.shards):
        try:
            check_shard(directory, m, i, checksum=True, labels=True, tokens=tokens)
            read_all_chunks(directory / entry.file, m)
        except DataError as exc:
            problems.append(str(exc))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).replace("\n", " ")
            problems.append(f"shard '{entry.file}': unreadable chunk: {reason}")
    for name in m.splits:
        try:
            load_split(directory, m, name, verify=True)
        except DataError as exc:
            problems.append(f"split '{name}': {exc}")
    try:
        extra = extra_files(m, directory)
    except DataError as exc:
        return [*problems, str(exc)]
    for name, sha in extra.items():
        try:
            if file_sha256(safe_member(directory, name, "extra file")) != sha:
                problems.append(f"file '{name}' fails its checksum (manifest params.extra_files)")
        except DataError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"file '{name}' cannot be read: {exc.strerror or exc}")
    return problems
