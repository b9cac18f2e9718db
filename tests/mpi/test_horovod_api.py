"""The Horovod API at 2 and 4 ranks: every collective, process sets, errors, join."""

from __future__ import annotations

import pytest

from tests.conftest import MpiRun

pytestmark = pytest.mark.mpi

GROUPS = [
    "allreduce_checks", "allgather_checks", "broadcast_checks", "alltoall_checks",
    "reducescatter_checks", "grouped_allreduce_checks", "gradient_checks", "misc_checks",
    "process sets", "errors on every rank", "SyncBatchNorm",
    "broadcast_optimizer_state and DistributedOptimizer", "optimizer wrapper forwards state",
    "uneven join",
]


@pytest.mark.parametrize("n", [2, 4])
def test_horovod_api(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["hvd_sets.py", "--all"], timeout=240)
    for group in GROUPS:
        assert f"PASS {group}" in proc.stdout, proc.stdout
