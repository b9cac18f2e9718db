"""--on-rank-loss shrink: a rank killed mid-run, the survivors go on inside the same job.

Open MPI under ``mpirun --with-ft ulfm`` (make setup installs it beside MPICH); ranks kill
themselves with SIGKILL where ``MPITRAIN_KILL_AT`` says (mpitrain/runtime/inject.py). Each
run has a time limit: a hang fails the test. Exact data coverage is read from --sample-log
(the rows a later incarnation trained again count once, from that one).
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mpitrain.checkpoint import files as ckpt
from mpitrain.runtime import env
from mpitrain.runtime.launch import find_ulfm_mpirun, launch_env, ulfm_command
from mpitrain.train.sample_log import kept_rows
from tests.conftest import ROOT, MpiRun

UlfmRun = Callable[..., subprocess.CompletedProcess[str]]
COMMON = ["-m", "mpitrain", "--on-rank-loss", "shrink", "--no-progress", "--global-batch", "48"]
#: the digits training split: 1437 samples, 29 global batches of 48 (the tail dropped)
EPOCH = 29 * 48


@pytest.fixture(scope="module")
def ulfm_mpirun() -> str:
    """Open MPI's mpirun; skips, or fails when MPITRAIN_REQUIRE_ULFM=1 (as in CI)."""
    exe = find_ulfm_mpirun()
    if exe is None:
        if env.get("require_ulfm") == "1":
            pytest.fail("Open MPI (ULFM) not found but MPITRAIN_REQUIRE_ULFM=1: make setup")
        pytest.skip("Open MPI not found (make setup installs it; MPITRAIN_REQUIRE_ULFM=1 fails)")
    return exe


@pytest.fixture()
def ulfm(ulfm_mpirun: str, digits_cache: Path) -> UlfmRun:
    """Run ``mpirun --with-ft ulfm -n N python ARGS``; a run past ``timeout`` fails."""

    def run(n: int, args: Sequence[str], *, timeout: float = 150, kill: str = "",
            expect: int = 0) -> subprocess.CompletedProcess[str]:
        cmd = [*ulfm_command(n, ulfm_mpirun), sys.executable, *args]
        extra = {"MPITRAIN_CACHE": str(digits_cache), "MPITRAIN_KILL_AT": kill}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(extra), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            pytest.fail(f"timed out after {timeout}s (hang): {' '.join(cmd)}\n{out[-4000:]}")
        if proc.returncode != expect:
            pytest.fail(f"exit {proc.returncode} (expected {expect}): {' '.join(cmd)}\n"
                        f"--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}")
        return proc

    return run


def coverage(log: Path, epochs: int) -> None:
    """Every sample of every epoch trained exactly once, 48 per kept step."""
    per_step: dict[int, int] = collections.Counter()
    seen: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for epoch, step, _, idx in kept_rows(log):
        per_step[step] += len(idx)
        seen[epoch].update(idx)
    assert set(per_step.values()) == {48}, {s: n for s, n in per_step.items() if n != 48}
    for epoch in range(epochs):
        twice = [i for i, c in seen[epoch].items() if c > 1]
        assert not twice and len(seen[epoch]) == EPOCH, (epoch, len(seen[epoch]), twice[:5])


def accuracy(proc: subprocess.CompletedProcess[str]) -> float:
    m = re.search(r"test accuracy ([0-9.]+)%", proc.stdout)
    assert m is not None, proc.stdout[-2000:]
    return float(m[1])


@pytest.mark.mpi
def test_one_of_four_ranks_killed_the_job_finishes_on_three(ulfm: UlfmRun,
                                                             tmp_path: Path) -> None:
    """Sync data parallel, kill -9 of launch rank 2 at step 15 (mid epoch 1 of 4): exit 0 on
    3 ranks from the step kept in memory, every sample of every epoch trained once, test
    accuracy within 0.5 points of an uninterrupted 4-rank run, training again within 15 s."""
    args = [*COMMON, "--epochs", "4"]
    ref = ulfm(4, args)
    runs, log = tmp_path / "run", tmp_path / "samples"
    proc = ulfm(4, [*args, "--sample-log", str(log), "--run-dir", str(runs)], kill="2:15")
    out = proc.stdout + proc.stderr
    assert "lost rank 2 of 4; continuing on 3 ranks from step 15 (kept in memory)" in out, out
    assert "done: 3 ranks, 4 epochs, 116 steps" in out, out
    coverage(log, 4)
    assert abs(accuracy(proc) - accuracy(ref)) <= 0.5, (accuracy(proc), accuracy(ref))
    killed = float(re.findall(r"killed at step 15 \(step\) t=([0-9.]+)", out)[0])
    steps = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    after = min(r["unix"] for r in steps if r.get("step", 0) == 16 and "unix" in r)
    assert after - killed < 15.0, after - killed


@pytest.mark.mpi
def test_two_failures_then_too_few_ranks_exit_99_and_resume(
        ulfm: UlfmRun, mpirun: MpiRun, tmp_path: Path) -> None:
    """Launch ranks 3 then 1 die (steps 8 and 20) under --min-ranks 3: the first failure is
    survived on 3 ranks, the second leaves 2: step 20 is saved from memory and the job exits
    99; --resume auto on 2 ranks finishes. Every sample of both epochs trained once."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    run = ["--epochs", "2", "--sample-log", str(log), "--checkpoint-dir", str(ck),
           "--checkpoint-every", "10"]
    proc = ulfm(4, [*COMMON, *run, "--min-ranks", "3"], kill="3:8,1:20", expect=99)
    out = proc.stdout + proc.stderr
    assert "lost rank 3 of 4; continuing on 3 ranks from step 8 (kept in memory)" in out, out
    assert "2 ranks left after losing [1], 2 usable, fewer than --min-ranks 3" in out, out
    assert "step 20 saved to" in out, out
    done = mpirun(2, ["-m", "mpitrain", "--no-progress", "--global-batch", "48", *run,
                      "--resume", "auto"], timeout=150)
    assert "resumed from" in done.stdout and "(step 20," in done.stdout, done.stdout
    coverage(log, 2)


@pytest.mark.mpi
def test_zero2_shard_lost_inside_a_checkpoint_write_reloads_and_reshards(
        ulfm: UlfmRun, tmp_path: Path) -> None:
    """ZeRO-2 (each rank holds a quarter of the optimizer state): launch rank 1 dies while
    the step-10 checkpoint is written. The survivors reload the newest complete checkpoint,
    resharded to 3, and finish; every checkpoint file left verifies; the steps after the
    checkpoint are trained again and counted once."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    args = [*COMMON, "--epochs", "2", "--shard", "gradients", "--sample-log", str(log),
            "--checkpoint-dir", str(ck), "--checkpoint-every", "5"]
    proc = ulfm(4, args, kill="1:10:checkpoint")
    out = proc.stdout + proc.stderr
    m = re.search(r"lost rank 1 of 4; continuing on 3 ranks from step (\d+) \(checkpoint ", out)
    assert m is not None and int(m[1]) in (5, 10), out
    assert "done: 3 ranks, 2 epochs, 58 steps" in out, out
    for info in ckpt.checkpoint_infos(ck):
        assert ckpt.verify(info.path) is None, info.path
    coverage(log, 2)
