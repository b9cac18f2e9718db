"""Never hang, decided together: rank-varying errors, parameter-server shutdown and
preemption on every rank of every mode, signals during start-up (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpitrain.checkpoint import files as ckpt
from mpitrain.runtime.launch import launch_env, mpiexec_command
from tests.conftest import ROOT, MpiRun

pytestmark = pytest.mark.mpi

MODELS = "tests.mpi.scenarios.train_models"
FAST = ["--epochs", "2", "--no-progress"]


def test_config_error_on_one_rank_ends_job_within_seconds(mpirun: MpiRun) -> None:
    t0 = time.monotonic()
    proc = mpirun(
        2, ["-m", "mpitrain", "--model", f"{MODELS}:config_error", *FAST],
        timeout=60, check=False,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert took < 40, took  # start-up (torch import) + the 5 s grace, never the 60 s timeout
    err = proc.stderr
    assert "rank 1/2 on " in err and "injected node-local config problem" in err, err
    assert "aborting the job" in err and "Traceback" not in err, err


def test_config_error_on_every_rank_is_printed_once(mpirun: MpiRun) -> None:
    proc = mpirun(
        2, ["-m", "mpitrain", "--model", f"{MODELS}:config_error_everywhere", *FAST],
        timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "injected config problem" in ln]
    assert len(lines) == 1 and lines[0].startswith("mpitrain: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "aborting" not in proc.stderr, proc.stderr


def test_param_server_shuts_down_without_eval_or_checkpoint(mpirun: MpiRun) -> None:
    proc = mpirun(
        3,
        ["-m", "mpitrain", "--exchange", "param-server", "--servers", "1",
         "--max-staleness", "2", "--test-split", "", "--epochs", "1", "--no-progress"],
        timeout=90,
    )
    assert "mpitrain: done: 2 ranks" in proc.stdout, proc.stdout


def _pid_of_rank(marker: str, rank: int, timeout: float = 60) -> int:
    """Find the process of MPI rank ``rank`` whose command line contains ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in cmd and "mpiexec" not in cmd and f"PMI_RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no process of rank {rank} with {marker!r}")


def _launch(n: int, args: list[str], cache: Path, extra: dict[str, str]) -> subprocess.Popen[str]:
    cmd = [*mpiexec_command(n), sys.executable, *args]
    env = launch_env({"MPITRAIN_CACHE": str(cache), **extra})
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(pred: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("target", ["server", "worker"])
def test_param_server_preemption_reaches_every_rank(
    mpiexec: str, digits_cache: Path, tmp_path: Path, target: str
) -> None:
    """USR1 to the server (or to one worker) -> agreed checkpoint on all ranks, exit 99."""
    ck = tmp_path / "ck"
    args = ["-m", "mpitrain", "--exchange", "param-server", "--servers", "1",
            "--max-staleness", "1", "--model", f"{MODELS}:slow", "--epochs", "6",
            "--batch-size", "32", "--no-progress", "--checkpoint-dir", str(ck),
            "--checkpoint-every", "2"]
    proc = _launch(3, args, digits_cache, {"TEST_PAUSE": "0.05"})
    try:
        pid = _pid_of_rank(str(ck), 2 if target == "server" else 1)
        _wait_for(lambda: bool(ckpt.list_checkpoints(ck)), 90)
        os.kill(pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 99, (proc.returncode, err[-3000:])
    assert "preempted" in out, out
    last = ckpt.find_latest(ck)
    assert last is not None
    state = ckpt.load(last)
    assert state["exchange"]["mode"] == "param-server"
    assert state["loop"]["step"] < 6 * 22, state["loop"]["step"]  # stopped early


def test_signal_during_startup_checkpoints_and_exits_99(
    mpirun: MpiRun, tmp_path: Path
) -> None:
    """USR1 while rank 1 builds its model (before training): recorded, then the agreed stop."""
    ck = tmp_path / "ck"
    proc = mpirun(
        2,
        ["-m", "mpitrain", "--model", f"{MODELS}:signal_at_build", *FAST,
         "--checkpoint-dir", str(ck)],
        timeout=60, check=False,
    )
    assert proc.returncode == 99, (proc.returncode, proc.stderr[-3000:])
    assert "preempted" in proc.stdout
    assert ckpt.find_latest(ck) is not None


def test_signal_during_import_is_not_fatal(digits_cache: Path, tmp_path: Path) -> None:
    """USR1 0.2 s after start (torch still importing): the run stops with a checkpoint, 99."""
    ck = tmp_path / "ck"
    env = launch_env({"MPITRAIN_CACHE": str(digits_cache)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpitrain", *FAST, "--checkpoint-dir", str(ck)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 99, (proc.returncode, err[-3000:])
    assert "preempted" in out and ckpt.find_latest(ck) is not None
