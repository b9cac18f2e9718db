"""Rank 1 builds a model with an extra layer: every rank must raise the same CommError.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/grad_mismatch.py
Rank 0 prints one "CAUGHT <rank> <message>" line per rank (gathered, so lines never interleave).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import CommError, DataParallel
from mpitrain.runtime.abort import run_mpi


def main(comm: MPI.Intracomm) -> int:
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    if comm.rank == 1:
        layers.append(nn.Linear(2, 2))
    outcome = "NOT RAISED"
    try:
        DataParallel(nn.Sequential(*layers), comm=comm)
    except CommError as exc:
        outcome = f"CAUGHT {comm.rank} {exc}"
    lines = comm.gather(outcome, root=0)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    return 0 if outcome.startswith("CAUGHT") else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(run_mpi(main))
