"""Multi-rank tests of the gradient engine (scenarios in tests/mpi/scenarios/grad_*.py)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import MpiRun

CHECKS = [
    "plain",
    "zero allocations in synchronize, grads alias buckets",
    "plain one bucket",
    "no_sync accumulation",
    "DistributedOptimizer backward_passes_per_step=2",
    "broadcast_optimizer_state",
    "DistributedOptimizer forwards param_groups after a state load",
    "unused branch",
    "batchnorm buffers",
    "fp16 hook",
    "bf16 hook",
    "fp16-ef hook",
    "bf16-ef hook",
]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_equivalence_to_one_process(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["grad_equivalence.py"], timeout=90)
    passed = {line[5:].rsplit(" (n=", 1)[0] for line in proc.stdout.splitlines()
              if line.startswith("PASS ")}
    assert passed == set(CHECKS), proc.stdout


@pytest.mark.mpi
def test_mismatched_model_fails_everywhere_with_same_message(mpirun: MpiRun) -> None:
    t0 = time.monotonic()
    proc = mpirun(2, ["grad_mismatch.py"], timeout=30)
    assert time.monotonic() - t0 < 15
    caught = sorted(line for line in proc.stdout.splitlines() if line.startswith("CAUGHT "))
    assert len(caught) == 2, proc.stdout
    msgs = {line.split(" ", 2)[2] for line in caught}
    assert len(msgs) == 1, caught
    msg = msgs.pop()
    assert "rank 1" in msg and "'3.weight'" in msg and "HINT:" in msg, msg


@pytest.mark.mpi
def test_horovod_script_runs_unchanged(mpirun: MpiRun) -> None:
    proc = mpirun(2, ["grad_horovod.py"], timeout=60)
    assert "PASS horovod script trains" in proc.stdout, proc.stdout
    acc = float(proc.stdout.split("ACCURACY ")[1].split()[0])
    assert acc > 0.8, proc.stdout
