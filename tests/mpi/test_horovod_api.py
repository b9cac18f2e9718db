"""The Horovod API at 2 and 4 ranks: every collective, process sets, errors, join; Horovod
scripts that import ``horovod`` themselves (the alias), elastic, and ranks that end unevenly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import MpiRun

pytestmark = pytest.mark.mpi

GROUPS = [
    "allreduce_checks", "allgather_checks", "broadcast_checks", "alltoall_checks",
    "reducescatter_checks", "grouped_allreduce_checks", "gradient_checks", "misc_checks",
    "client_semantics_checks", "sparse_optimizer_checks", "async_checks", "cache_checks",
    "process sets", "errors on every rank", "SyncBatchNorm",
    "broadcast_optimizer_state and DistributedOptimizer", "optimizer wrapper forwards state",
    "uneven join",
]


@pytest.mark.parametrize("n", [2, 4])
def test_horovod_api(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["hvd_sets.py", "--all"], timeout=240)
    for group in GROUPS:
        assert f"PASS {group}" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def horovod_alias(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``python -m mpitrain.horovod install-alias`` into a temporary directory (never the
    environment); returns the PYTHONPATH that makes ``import horovod`` find it."""
    target = tmp_path_factory.mktemp("alias")
    proc = subprocess.run([sys.executable, "-m", "mpitrain.horovod", "install-alias",
                           "--target", str(target)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_horovod_script_via_alias_elastic_and_uneven_ends(
    mpirun: MpiRun, horovod_alias: dict[str, str]
) -> None:
    """3 ranks of a script written against ``horovod.torch``: the alias, ``hvd.elastic.run``
    with a TorchState, then rank 1 shutting down (and later exiting) while its peers are in
    collectives: they raise Horovod's shut-down error, and the job ends with code 0."""
    proc = mpirun(3, ["hvd_alias_elastic.py"], timeout=180, extra_env=horovod_alias)
    for group in ("horovod alias", "elastic", "shutdown while peers are in a collective",
                  "exit while peers are in a collective"):
        assert f"PASS {group}" in proc.stdout, proc.stdout + proc.stderr


def test_uncaught_exception_after_init_ends_the_job(
    mpirun: MpiRun, horovod_alias: dict[str, str]
) -> None:
    """Rank 1 raises after ``hvd.init()`` while rank 0 is in allreduce: the job ends within
    seconds, non-zero, naming the rank and the reason (before: rank 0 waited forever)."""
    t0 = time.monotonic()
    proc = mpirun(2, ["hvd_crash.py"], timeout=90, extra_env=horovod_alias, check=False)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "UNREACHED" not in out, out
    assert re.search(r"rank 1/2 on \S+: unhandled exception", out), out
    assert "RuntimeError: deliberate failure on rank 1 after hvd.init()" in out, out
    assert took < 60, took
