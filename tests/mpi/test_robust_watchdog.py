"""Never hang: the watchdog names a sleeping rank and aborts; kill -9 of a rank ends the job."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.mpi


def test_sleeping_rank_is_named_and_job_aborts(mpirun) -> None:
    t0 = time.monotonic()
    proc = mpirun(2, ["robust_hang.py", "3"], timeout=3 + 15, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 3 + 15
    assert "late: rank 1 " in out, out
    assert "in sleepy_compute" in out, out  # rank 1's own stack, printed by its watchdog thread
    assert "not reached" not in out


def test_kill_9_of_rank_1_ends_job_within_30s(mpirun) -> None:
    t0 = time.monotonic()
    proc = mpirun(2, ["robust_kill.py", "10"], timeout=30, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 30
    assert "rank 1: SIGKILL myself" in proc.stdout


def test_frozen_rank_is_named_as_never_answered(mpirun) -> None:
    """SIGSTOP: rank 1 alive but unable to run even its watchdog thread; rank 0 names it."""
    t0 = time.monotonic()
    proc = mpirun(2, ["robust_kill.py", "3", "stop"], timeout=3 + 15, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 3 + 15
    assert "rank 1: SIGSTOP myself" in out
    assert "never answered: rank 1. Aborting the job (exit 1)." in out, out


def test_exception_in_background_thread_aborts_job(mpirun) -> None:
    t0 = time.monotonic()
    proc = mpirun(2, ["robust_thread_exc.py"], timeout=30, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert elapsed < 30  # watchdog is armed with 60 s: only the excepthook can be this fast
    assert "rank 1/2 on " in out and "unhandled exception, aborting the job" in out, out
    assert "OSError: injected read failure in a background thread" in out
    assert "in prefetch_worker" in out  # the traceback names the failing thread function
    assert "not reached" not in out
