"""Hierarchical, staged and CUDA-aware reducers, the CUDA-aware decision and device binding
across 4 ranks as pretend nodes (one mpiexec launch; checks in scenarios/device_reducers.py)."""

from __future__ import annotations

import pytest

from tests.conftest import MpiRun

EXPECTED = [
    "hierarchical == flat for 4 ranks as 2x2",
    "hierarchical == flat for 4 ranks as 4x1",
    "hierarchical == flat for 4 ranks as 1x4",
    "staged (CPU, forced) == direct bitwise; buffers allocated once and reused",
    "staged over hierarchical == hierarchical bitwise",
    "CUDA-aware reducer code path on CPU == flat bitwise",
    "make_reducer stacks",
    "engine + hooks (none, bf16, fp16-ef) on staged == flat bitwise",
    "decide_cuda_aware agrees on every rank",
    "bind_device: one GPU per local rank",
]


@pytest.mark.mpi
def test_device_reducers_4_ranks(mpirun: MpiRun) -> None:
    proc = mpirun(
        4, ["device_reducers.py"], timeout=120, extra_env={"MPITRAIN_RANKS_PER_NODE": "2"}
    )
    ok = [line[3:] for line in proc.stdout.splitlines() if line.startswith("OK ")]
    for want in EXPECTED:
        assert any(line.startswith(want) for line in ok), (want, proc.stdout)
