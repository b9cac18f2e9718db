"""Optional parallel HDF5: open a dataset's shards with the MPI-IO driver on every rank.

Needs an h5py built against an MPI-enabled HDF5 (``h5py.get_config().mpi``; docs/data.md says
how to build one). Opening is collective (every rank of ``comm`` opens every shard, in manifest
order). Reads stay independent MPI-IO operations: each rank reads a different number of
segments per step, and a collective read would need the same calls on every rank. What MPI-IO
brings is the site's tuned file-system layer (e.g. Lustre striping hints) behind one open file
per shard and job instead of one POSIX open per shard and rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mpitrain.errors import ConfigError, DataError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.data.dataset import ShardedDataset

DRIVERS = ("posix", "mpio")
BUILD_HINT = (
    "build h5py against an MPI-enabled HDF5: CC=mpicc HDF5_MPI=ON HDF5_DIR=$HDF5_ROOT "
    "pip install --no-binary=h5py h5py (docs/data.md), or use --hdf5-driver posix"
)


def h5py_has_mpi() -> bool:
    """Whether this h5py was built with MPI support (no MPI call)."""
    import h5py

    return bool(h5py.get_config().mpi)


def check_driver(driver: str, prefetch: int, thread_level: int, thread_multiple: int) -> None:
    """Raise ConfigError unless ``driver`` can be used here (same answer on every rank)."""
    if driver not in DRIVERS:
        raise ConfigError(with_hint(f"--hdf5-driver {driver!r} is unknown", f"use {DRIVERS}"))
    if driver == "posix":
        return
    if not h5py_has_mpi():
        raise ConfigError(with_hint("--hdf5-driver mpio: this h5py has no MPI support",
                                    BUILD_HINT))
    if prefetch > 0 and thread_level < thread_multiple:
        raise ConfigError(
            with_hint(
                "--hdf5-driver mpio with a prefetch thread needs MPI_THREAD_MULTIPLE "
                "(the reader thread calls MPI-IO)",
                "use --prefetch 0, or an MPI that grants MPI_THREAD_MULTIPLE",
            )
        )


def open_mpio(dataset: ShardedDataset, comm: MPI.Intracomm) -> None:
    """Collective: open every shard of ``dataset`` with ``driver="mpio"`` on all ranks.

    Raises:
        DataError: on every rank alike when any rank cannot open a shard.
    """
    import h5py
    from mpi4py import MPI

    files: dict[int, Any] = {}
    error = ""
    for i, entry in enumerate(dataset.manifest.shards):
        path = dataset.directory / entry.file
        try:
            files[i] = h5py.File(path, "r", driver="mpio", comm=comm)
        except OSError as exc:
            error = f"rank {comm.rank}: cannot open shard '{path}' with MPI-IO: {exc}"
        failed = comm.allreduce(1 if error else 0, op=MPI.MAX)  # opens are collective
        if failed:
            reasons = [e for e in comm.allgather(error) if e]
            # closing is collective too: close only the shards every rank opened (before i);
            # shard i is open on some ranks only and is left to process exit
            for j in range(i):
                files[j].close()
            raise DataError(with_hint(reasons[0], "check that every node sees the dataset"))
    dataset.adopt_files(files)


def use_driver(driver: str, prefetch: int, datasets: Sequence[ShardedDataset | None],
               comm: MPI.Intracomm) -> None:
    """Collective: open ``datasets``' shards with ``--hdf5-driver`` (nothing to do for posix);
    a driver this h5py or MPI cannot give is refused on every rank alike."""
    if driver == "posix":
        return
    from mpi4py import MPI

    from mpitrain.runtime.collective import agree

    level = MPI.Query_thread()
    agree(comm, lambda: check_driver(driver, prefetch, level, MPI.THREAD_MULTIPLE))
    for ds in datasets:
        if ds is not None:
            open_mpio(ds, comm)
