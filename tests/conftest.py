"""Shared fixtures: run scenario scripts under mpiexec with a timeout."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mpitrain.runtime import env
from mpitrain.runtime.launch import find_mpiexec, find_ulfm_mpirun, launch_env, mpiexec_command

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "mpi" / "scenarios"

MpiRun = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """Path of mpiexec; skips, or fails when MPITRAIN_REQUIRE_MPI=1 (as in CI)."""
    exe = find_mpiexec()
    if exe is None:
        if env.get("require_mpi") == "1":
            pytest.fail("mpiexec not found but MPITRAIN_REQUIRE_MPI=1")
        pytest.skip("mpiexec not found (set MPITRAIN_REQUIRE_MPI=1 to make this a failure)")
    return exe


@pytest.fixture(scope="session")
def ulfm_mpirun() -> str:
    """Open MPI's mpirun; skips, or fails when MPITRAIN_REQUIRE_ULFM=1 (as in CI)."""
    exe = find_ulfm_mpirun()
    if exe is None:
        if env.get("require_ulfm") == "1":
            pytest.fail("Open MPI (ULFM) not found but MPITRAIN_REQUIRE_ULFM=1: make setup")
        pytest.skip("Open MPI not found (make setup installs it; MPITRAIN_REQUIRE_ULFM=1 fails)")
    return exe


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MPITRAIN_CACHE for the whole session: the digits shards are built once."""
    return tmp_path_factory.mktemp("mpitrain-cache")


def job_runner(mpiexec: str, cache: Path) -> MpiRun:
    """The ``mpirun`` fixture's function, for fixtures of a wider scope (one job per module)."""

    def run(
        n: int,
        args: Sequence[str],
        *,
        timeout: float = 120,
        extra_env: dict[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = list(args)
        if argv and argv[0].endswith(".py") and not Path(argv[0]).is_absolute():
            argv[0] = str(SCENARIOS / argv[0])
        cmd = [*mpiexec_command(n, mpiexec), sys.executable, *argv]
        child_env = launch_env({"MPITRAIN_CACHE": str(cache), **(extra_env or {})})
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            text = out.decode() if isinstance(out, bytes) else out
            pytest.fail(f"timed out after {timeout}s (hang): {' '.join(cmd)}\n{text[-4000:]}")
        if check and proc.returncode != 0:
            pytest.fail(
                f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}"
                f"\n--- stderr\n{proc.stderr[-6000:]}"
            )
        return proc

    return run


@pytest.fixture()
def mpirun(mpiexec: str, digits_cache: Path) -> MpiRun:
    """Run ``mpiexec -n N python ARGS`` from the repo root; returns the completed process.

    ``args`` is a script path (relative to tests/mpi/scenarios or absolute) or ``-m module``
    arguments. A run past ``timeout`` seconds fails the test (a hang is a bug).
    """
    return job_runner(mpiexec, digits_cache)
