"""Parallel conversion: shard i is written by rank i % N; rank 0 writes the manifest last."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.data.manifest import write_manifest
from mpitrain.data.writer import (
    ShardResult,
    Source,
    build_manifest,
    check_options,
    check_target,
    publish,
    shard_count,
    temp_dir_for,
    write_shards,
)
from mpitrain.errors import DataError, with_hint
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
) -> Path:
    """Collective: write ``source`` as a dataset directory ``out`` using every rank of ``comm``.

    All ranks write into one hidden temporary directory; after a collective check that every
    shard exists, rank 0 writes the manifest there and renames the directory into place. The
    result does not depend on the number of ranks. A failure on any rank fails every rank and
    leaves ``out`` untouched.
    """

    def prepare() -> Path:
        check_options(compression, samples_per_shard)
        check_target(out, overwrite)
        return temp_dir_for(out, "convert")

    tmp = agree(comm, prepare)
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.Barrier()
    total = shard_count(source.num_samples, samples_per_shard)
    mine = range(comm.rank, total, comm.size)
    results: list[ShardResult] = agree(
        comm,
        lambda: write_shards(
            tmp,
            source,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            shards=mine,
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
                with_hint(f"conversion into '{out}' lost shards {missing}", "re-run the conversion")
            )
        manifest = build_manifest(
            source,
            flat,
            name=name,
            samples_per_shard=samples_per_shard,
            compression=compression,
            splits={},
            params=dict(params or {}),
        )
        write_manifest(tmp, manifest)
        publish(tmp, out, overwrite)

    agree(comm, finish)
    return out
