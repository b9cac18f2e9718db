"""Never hang, at trainer level: a sleeping rank and a SIGKILLed rank end the job quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi

MODEL = "tests.mpi.scenarios.robust_sleepy"
ARGS = ["-m", "mpitrain", "--epochs", "1", "--no-progress"]


def test_trainer_hang_watchdog_names_rank_1(mpirun, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = mpirun(
        2, [*ARGS, "--model", f"{MODEL}:factory", "--hang-timeout", "5"], timeout=60, check=False
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "late: rank 1 (not inside 'gradient all-reduce' where ranks 0 wait)" in out, out
    assert "in sleepy_forward" in out, out  # rank 1's stack from its own watchdog thread
    assert "mpitrain: done" not in out
    assert elapsed < 45


def test_trainer_kill_9_of_rank_1_exits_nonzero_within_30s(mpirun, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = mpirun(2, [*ARGS, "--model", f"{MODEL}:killer"], timeout=30, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank 1: SIGKILL myself" in proc.stdout
    assert elapsed < 30
