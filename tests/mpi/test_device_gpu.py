"""Device paths on a real GPU (marked ``gpu``; skipped without CUDA, e.g. in this project's CI)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import MpiRun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.mpi,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_device_reducers_on_gpu(mpirun: MpiRun) -> None:
    ranks = 2
    args = ["device_gpu.py"]
    if torch.cuda.device_count() < ranks:
        args.append("--allow-shared")
    proc = mpirun(ranks, args, timeout=300, extra_env={"MPITRAIN_RANKS_PER_NODE": "1"})
    lines = proc.stdout.splitlines()
    assert any(line.startswith("DECISION cuda-aware MPI: ") for line in lines), proc.stdout
    ok = [line for line in lines if line.startswith("OK ")]
    assert len(ok) == 4, proc.stdout
