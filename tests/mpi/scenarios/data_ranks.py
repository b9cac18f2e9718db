"""Each rank reads exactly its samples: loader output equals direct reads, union covers all.

Run: mpiexec -n 3 python tests/mpi/scenarios/data_ranks.py DATASET_DIR
"""

from __future__ import annotations

import sys

import h5py
import numpy as np
from mpi4py import MPI

from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest
from mpitrain.runtime.abort import run_mpi


def reference(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the whole dataset straight from the shards the manifest lists."""
    m = load_manifest(directory)
    xs, ys = [], []
    for s in m.shards:
        with h5py.File(f"{directory}/{s.file}") as f:
            xs.append(f["x"][:])
            ys.append(f["y"][:])
    return np.concatenate(xs), np.concatenate(ys)


def main(comm: MPI.Intracomm) -> None:
    directory = sys.argv[1]
    x_ref, _ = reference(directory)
    ds = ShardedDataset(directory, in_memory=False)  # each rank reads its part from HDF5
    for shuffle in ("global", "chunk"):
        sampler = DistributedSampler(len(ds), comm.rank, comm.size, seed=7, shuffle=shuffle)
        loader = BatchLoader(ds, sampler, 32, prefetch=2)
        loader.set_epoch(1)
        mine = []
        for (idx, mask), batch in zip(list(sampler.batches(32)), loader, strict=True):
            assert np.array_equal(batch.x.numpy(), x_ref[idx]), f"rank {comm.rank}: wrong data"
            mine += idx[mask].tolist()
        everyone = comm.gather(mine, root=0)
        if comm.rank == 0:
            assert everyone is not None
            flat = [i for part in everyone for i in part]
            assert sorted(flat) == list(range(len(ds))), f"{shuffle}: coverage broken"
            print(f"{shuffle}: {len(flat)} samples, each exactly once", flush=True)
    if comm.rank == 0:
        print("data_ranks OK", flush=True)


if __name__ == "__main__":
    sys.exit(run_mpi(lambda comm: main(comm) or 0))
