"""Multi-rank tests of tensor parallelism (scenario in tests/mpi/scenarios/tensor_parallel.py)."""

from __future__ import annotations

import pytest

from tests.conftest import MpiRun

CHECKS = {
    "column parallel, output split",
    "column parallel, output gathered",
    "column then row (MLP pattern)",
    "sequence parallel MLP",
    "vocab parallel embedding",
    "vocab parallel cross-entropy",
    "tied head",
    "3-D inputs",
    "bad sizes raise ValueError",
}
GRID_CHECKS = {"grid communicators"}  # needs 4 ranks (tensor 2 x pipeline 2)


def _passed(stdout: str) -> set[str]:
    return {line[5:].rsplit(" (n=", 1)[0] for line in stdout.splitlines()
            if line.startswith("PASS ")}


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_parallel_layers_equal_dense(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["tensor_parallel.py"], timeout=120)
    want = CHECKS | GRID_CHECKS if n == 4 else CHECKS
    assert _passed(proc.stdout) == want, proc.stdout
