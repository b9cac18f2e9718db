"""Parallel conversion: shard i is written by rank i % N; rank 0 writes the manifest last."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.data.manifest import check_name, write_manifest
from mpitrain.data.reader import CheckedSource
from mpitrain.data.writer import (
    ShardResult,
    Source,
    build_manifest,
    check_options,
    check_target,
    make_temp_dir,
    publish,
    shard_count,
    write_shards,
)
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime import files
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    from mpi4py import MPI


def convert(
    comm: MPI.Intracomm,
    source: Source,
    out: Path,
    *,
    name: str,
    samples_per_shard: int,
    compression: str | None = None,
    overwrite: bool = False,
    params: dict[str, Any] | None = None,
    inputs: Sequence[Path] = (),
    num_classes: int | None = None,
    vocab: int | None = None,
) -> Path:
    """Collective: write ``source`` as a dataset directory ``out`` using every rank of ``comm``.

    All ranks write into one fresh hidden directory (unique to this conversion); after a
    collective check that every shard exists, rank 0 writes the manifest there and renames
    the directory into place. The result does not depend on the number of ranks. A failure
    on any rank fails every rank, removes the temporary directory and leaves ``out``
    untouched; so does a dataset that another writer published at ``out`` meanwhile.
    ``overwrite`` replaces only a dataset directory that none of ``inputs`` is in. With
    ``vocab``, ``x`` holds token ids: each must be an integer in ``[0, vocab)``; they are
    stored as integers and the manifest's params record ``vocab``.
    """

    def prepare() -> tuple[CheckedSource, files.DirIdentity | None]:
        check_name(name, "--name")
        check_options(compression, samples_per_shard)
        checked = CheckedSource(source, num_classes, vocab)
        return checked, check_target(out, overwrite, inputs)

    checked, replace = agree(comm, prepare)
    tmp = comm.bcast(agree(comm, lambda: make_temp_dir(out) if comm.rank == 0 else None))
    try:
        total = shard_count(checked.num_samples, samples_per_shard)
        results: list[ShardResult] = agree(
            comm,
            lambda: write_shards(
                tmp,
                checked,
                name=name,
                samples_per_shard=samples_per_shard,
                compression=compression,
                shards=range(comm.rank, total, comm.size),
            ),
        )
        gathered = comm.gather(results, root=0)

        def finish() -> None:
            if comm.rank != 0:
                return
            assert gathered is not None
            flat = [r for part in gathered for r in part]
            missing = [r.entry.file for r in flat if not (tmp / r.entry.file).exists()]
            if len(flat) != total or missing:
                raise DataError(
                    with_hint(
                        f"conversion into '{out}' lost shards {missing}", "re-run the conversion"
                    )
                )
            manifest = build_manifest(
                checked,
                flat,
                name=name,
                samples_per_shard=samples_per_shard,
                compression=compression,
                splits={},
                params=dict(params or {}),
            )
            write_manifest(tmp, manifest)
            publish(tmp, out, replace)

        agree(comm, finish)
    finally:
        # every rank is past its writes here (agree is collective): rank 0 clears the rest
        if comm.rank == 0:
            files.remove_path(tmp)
    return out
