"""Rank 1 builds a model with an extra layer: every rank must raise the same CommError.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/grad_mismatch.py
Each rank prints "CAUGHT <rank> <message>" and exits 0; anything else exits non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import CommError, DataParallel


def main() -> int:
    comm = MPI.COMM_WORLD.Dup()
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    if comm.rank == 1:
        layers.append(nn.Linear(2, 2))
    try:
        DataParallel(nn.Sequential(*layers), comm=comm)
    except CommError as exc:
        print(f"CAUGHT {comm.rank} {exc}", flush=True)
        return 0
    print(f"NOT RAISED on rank {comm.rank}", flush=True)
    return 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
