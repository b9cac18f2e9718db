"""Multi-rank timeline: Chrome trace structure, bucket completions, clock alignment, bounds.

Scenario: tests/mpi/scenarios/timeline_dp.py (DataParallel on 2 ranks with skewed clocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.timeline.summary import load, problems, summarize
from tests.conftest import MpiRun

#: stated bound: barrier-marked events of all ranks, aligned, at least once within this (µs)
#: or within the trace's own stated bound (+ 200 µs of barrier exit skew) if that is larger
ALIGN_US = 1000.0


@pytest.mark.mpi
def test_timeline_of_data_parallel(mpirun: MpiRun, tmp_path: Path) -> None:
    proc = mpirun(2, ["timeline_dp.py", str(tmp_path)], timeout=120)
    for check in ("dp", "window", "ring"):
        assert f"PASS {check} trace written" in proc.stdout, proc.stdout
    n_buckets = int(proc.stdout.split("BUCKETS ")[1].split()[0])
    assert n_buckets == 3

    raw = json.loads((tmp_path / "dp.json").read_text())  # plain Chrome trace JSON
    assert isinstance(raw["traceEvents"], list)
    doc = load(tmp_path / "dp.json")
    assert problems(doc) == []
    evs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in evs} == {0, 1}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    for rank in (0, 1):
        assert names[(rank, 0)] == "steps"
        assert [names[(rank, 1 + b)] for b in range(n_buckets)] == ["bucket 0", "bucket 1",
                                                                   "bucket 2"]
        for step in range(8):
            mine = [e for e in evs if e["pid"] == rank and e["args"]["step"] == step]
            launches = sorted(e["tid"] for e in mine if e["cat"] == "launch")
            flights = sorted(e["tid"] for e in mine if e["cat"] == "bucket")
            assert launches == flights == [1, 2, 3], (rank, step, mine)
            order = [e["name"] for e in sorted(mine, key=lambda e: e["ts"]) if e["tid"] == 0
                     and e["cat"] in ("data", "compute", "sync")]
            assert order == ["data wait", "forward", "backward", "synchronize", "optimizer"]

    # clocks: rank 1 ran 7 s ahead and 20000 ppm fast; the fit must find both, within the
    # error it states (half a round trip; ~40 µs on a quiet machine, ms under heavy load)
    c1 = doc["otherData"]["clocks"][1]
    rtt_s, rtt_e = c1["rtt_ns"]
    # rank 1 reads local = t + 7 s + 0.02 (t - origin) at rank-0 time t: at its start sample
    origin = int(proc.stdout.split("ORIGIN ")[1].split()[0])
    local = c1["start_local_ns"]
    true_t = (local - 7_000_000_000 + 0.02 * origin) / 1.02
    assert abs(c1["offset_ns"] - (local - true_t)) <= rtt_s / 2 + 10_000, c1
    drift_tol = (rtt_s + rtt_e) / 2 / c1["fit_span_ns"] * 1e6 + 50
    expected = 20_000 / 1.02  # offset change per ns of rank 1's own (2% fast) clock
    assert abs(c1["drift_ppm"] - expected) <= drift_tol, c1
    marks: dict[int, dict[int, float]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "i" and e["name"] == "barrier":
            marks.setdefault(e["args"]["i"], {})[e["pid"]] = e["ts"]
    spreads = [abs(m[1] - m[0]) for m in marks.values()]
    assert len(spreads) == 10
    bound_us = max(ALIGN_US, c1["bound_ns"] / 1000 + 200)
    assert min(spreads) < bound_us, (spreads, c1)

    # the known straggler: the last rank sleeps 15 ms before synchronize in every step
    s = summarize(doc)
    assert [r.last_rank for r in s.steps[1:]] == [1] * 7, s.steps
    late = sorted(r.late_by or 0.0 for r in s.steps[1:])
    assert late[len(late) // 2] > 7.5, late  # median; scheduling noise on a loaded machine

    # bounded: a window records only its steps; a ring buffer only its capacity
    window = load(tmp_path / "window.json")
    assert problems(window) == []
    assert {e["args"]["step"] for e in window["traceEvents"] if e["ph"] != "M"} == set(
        range(100, 105))
    ring = load(tmp_path / "ring.json")
    for c in ring["otherData"]["clocks"]:
        assert c["recorded"] > 4000 and c["recorded"] - c["dropped"] == 400
    assert (tmp_path / "ring.json").stat().st_size < 200_000


@pytest.mark.mpi
def test_bucket_autotune_picks_the_faster_size(mpirun: MpiRun) -> None:
    proc = mpirun(2, ["timeline_autotune.py"], timeout=120)
    for check in ("picks the faster size", "same choice and parameters on every rank",
                  "resumes with the chosen size"):
        assert f"PASS {check}" in proc.stdout, proc.stdout
    table = proc.stdout.split("TABLE ")[1].splitlines()[0]
    assert table.startswith("bucket 0.01 MiB: ") and table.endswith(" -> 16 MiB"), table


@pytest.mark.mpi
def test_trainer_writes_a_timeline(mpirun: MpiRun, tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    ckpt = tmp_path / "ckpt"
    proc = mpirun(2, ["-m", "mpitrain", "--max-steps", "8", "--no-progress",
                      "--checkpoint-dir", str(ckpt), "--checkpoint-every", "3",
                      "--timeline-steps", "2:6"], timeout=120,
                  extra_env={"MPITRAIN_TIMELINE": str(trace)})
    assert "done" in proc.stdout, proc.stdout
    doc = load(trace)
    assert problems(doc) == []
    evs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["step"] for e in evs} == {2, 3, 4, 5}
    for rank in (0, 1):
        for step in (2, 3, 4, 5):
            mine = [e for e in evs if e["pid"] == rank and e["args"]["step"] == step]
            names = {e["name"] for e in mine}
            assert {"step", "data wait", "forward", "backward", "synchronize", "optimizer",
                    "step agreement", "launch"} <= names, (rank, step, names)
            assert any(e["cat"] == "bucket" for e in mine)
        assert any(e["name"] == "checkpoint" and e["pid"] == rank for e in evs)  # step 3 -> 3
    s = summarize(doc)
    assert [r.step for r in s.steps] == [2, 3, 4, 5]
    # preempted (SIGUSR1 on rank 1 at its 6th forward): the ranks stop together, and the
    # timeline of the steps so far is still written
    stopped = tmp_path / "stopped.json"
    pre = mpirun(2, ["-m", "mpitrain", "--model", "tests.mpi.scenarios.train_models:signals",
                     "--max-steps", "40", "--no-progress", "--timeline", str(stopped),
                     "--timeline-steps", "0:1000"], timeout=120, check=False,
                 extra_env={"TEST_STEP": "6"})
    assert pre.returncode == 99 and "preempted" in pre.stdout, pre.stdout + pre.stderr
    got = load(stopped)
    assert problems(got) == []
    steps = {e["args"]["step"] for e in got["traceEvents"] if e["ph"] == "X"}
    assert set(range(6)) <= steps and max(steps) < 39, steps
    bad = mpirun(2, ["-m", "mpitrain", "--max-steps", "1", "--timeline", str(trace),
                     "--timeline-steps", "9:3"], timeout=60, check=False)
    assert bad.returncode == 2 and "need 0 <= A < B" in bad.stderr, bad.stderr


def test_trainer_bucket_autotune_picks_agrees_and_resumes(mpirun: MpiRun, tmp_path: Path) -> None:
    """--bucket-mb auto: the search runs once, is logged as a table, and a resume keeps it."""
    from mpitrain.checkpoint import files as ckpt

    ck = tmp_path / "ck"
    common = ["-m", "mpitrain", "--bucket-mb", "auto", "--no-progress", "--epochs", "3",
              "--checkpoint-dir", str(ck)]
    first = mpirun(2, [*common, "--max-steps", "30", "--checkpoint-every", "30"], timeout=120)
    lines = [ln for ln in first.stderr.splitlines() if "bucket autotune:" in ln]
    assert len(lines) == 1 and "1 MiB:" in lines[0] and " -> " in lines[0], first.stderr
    saved = ckpt.find_latest(ck)
    assert saved is not None
    chosen = ckpt.load(saved)["bucket_autotune"]["chosen_mb"]
    assert chosen in (1.0, 4.0, 16.0) and lines[0].endswith(f"-> {chosen:g} MiB"), lines
    again = mpirun(2, [*common, "--resume", "auto"], timeout=120)
    assert "bucket autotune:" not in again.stderr, again.stderr  # kept from the checkpoint
    final = ckpt.find_latest(ck)
    assert final is not None and final != saved
    assert ckpt.load(final)["bucket_autotune"]["chosen_mb"] == chosen
