"""``python -m mpitrain.bench recovery``: a small run of both paths, its parsers, and its refusal
without Open MPI.

The run kills launch rank 1 of 2 at step 3, before the first checkpoint: the shrink path goes
on from memory on one rank, today's path (abort, then ``--resume auto``) starts over. Each
job of the bench has its own time limit (``--timeout``); the whole run has this test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpitrain.bench import recovery
from mpitrain.runtime.launch import launch_env
from tests.conftest import ROOT

KILL = ("mpitrain: fault injection: launch rank 2 killed at step 15 (step) "
        "t=1796690810.308185\n")
REPORT = ("mpitrain: lost rank 2 of 4; continuing on 3 ranks from step 10 (checkpoint "
          "/tmp/ck/step-000000010.pt); failure seen t=1796690810.469832, agree 0.003 s, "
          "shrink 0.001 s, rebuild 0.187 s, state 0.071 s\n")


@pytest.mark.mpi
def test_bench_recovery_both_paths(ulfm_mpirun: str, digits_cache: Path,
                                   tmp_path: Path) -> None:
    """Every phase column of both paths, a positive total, no work lost by shrinking."""
    out = tmp_path / "recovery.json"
    cmd = [sys.executable, "-m", "mpitrain.bench", "recovery", "--ranks", "2", "--kill-step",
           "3", "--checkpoint-every", "50", "--max-steps", "5", "--timeout", "150",
           "--mpirun", ulfm_mpirun, "--out", str(tmp_path / "jobs"), "--json", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env=launch_env({"MPITRAIN_CACHE": str(digits_cache)}))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out (hang): {' '.join(cmd)}\n{exc.stdout!r}"[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["path"]: r for r in json.loads(out.read_text())["rows"]}
    shrink, abort = rows["shrink"], rows["abort"]
    for key in ("detect_s", "agree_s", "shrink_s", "rebuild_s", "state_s", "first_step_s"):
        assert shrink[key] >= 0, (key, shrink)
    assert abort["exit_s"] >= 0 and abort["startup_s"] > 0, abort
    for row in (shrink, abort):
        assert row["recovery_s"] > 0 and row["total_s"] >= row["recovery_s"], row
        assert row["step_s"] > 0, row
    assert shrink["lost_steps"] == 0 and shrink["lost_s"] == 0, shrink
    assert shrink["continued_from"] == "kept in memory", shrink
    assert abort["lost_steps"] == 3, abort  # no checkpoint yet: the relaunch starts over
    for label in ("detection (kill -> failure seen)", "relaunch -> first step done", "total",
                  "total abort / shrink (none)"):
        assert label in proc.stdout, proc.stdout


def test_parsers_read_the_runs_lines() -> None:
    """The kill's line, the survivors' report, a resumed relaunch, step gaps."""
    assert recovery.parse_kill("x\n" + KILL) == (2, 15, 1796690810.308185)
    got = recovery.parse_report("noise\n" + REPORT)
    assert got is not None and got["step"] == 10 and got["size"] == 3 and got["lost"] == [2]
    assert got["source"] == "checkpoint /tmp/ck/step-000000010.pt"
    assert got["rebuild_s"] == pytest.approx(0.187) and got["seen"] == 1796690810.469832
    two = recovery.parse_report(REPORT.replace("rank 2 of", "ranks 1, 2 of"))
    assert two is not None and two["lost"] == [1, 2]
    text = "mpitrain: resumed from /tmp/ck/step-000000010.pt (step 10, run r, 2026; saved by 4"
    assert recovery.parse_resumed(text) == 10 and recovery.parse_resumed("fresh") == 0
    ends = [100.0, 100.1, 100.3, 100.4, 100.5]
    records = [{"step": s + 1, "unix": t} for s, t in enumerate(ends)]
    assert recovery.median_step(records, 100.45) == pytest.approx(0.1)  # of 0.1, 0.2, 0.1
    after = recovery.first_after(records, 100.35)
    assert after is not None and after["step"] == 4
    with pytest.raises(recovery.BenchError, match="raise --kill-step"):
        recovery.median_step(records, 100.05)


def test_ratios_and_table() -> None:
    """Medians over the trials that completed; a failed one is counted, not averaged."""
    shrink = recovery.summarize("shrink", "none", [
        {"recovery_s": 0.5, "total_s": 0.5, "lost_steps": 0, "continued_from": "memory"},
        {"error": "the shrink job did not survive the kill (exit 1): ..."},
        {"recovery_s": 0.7, "total_s": 0.7, "lost_steps": 0, "continued_from": "memory"}])
    assert shrink["failed"] == 1 and shrink["total_s"] == pytest.approx(0.6)
    abort = recovery.summarize("abort", "none", [
        {"recovery_s": 20.0, "total_s": 24.6, "lost_steps": 5, "continued_from": "c"}])
    assert recovery.ratios([shrink, abort]) == {"none": pytest.approx(41.0)}
    lines = recovery.table([shrink, abort]).splitlines()
    assert "total abort / shrink (none): 41.0x" in lines
    got = {line[:36].strip(): line[36:].split() for line in lines[1:]}
    assert got["total"] == ["0.600", "24.600"] and got["failed trials"] == ["1", "0"]
    assert got["detection (kill -> failure seen)"] == ["-", "-"]
    failed = recovery.summarize("shrink", "none", [{"error": "x"}])
    assert recovery.ratios([failed, abort]) == {}
    assert "total abort" not in recovery.table([failed, abort])


def test_without_open_mpi_it_says_so_and_how(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(recovery, "find_ulfm_mpirun", lambda: None)
    assert recovery.main([]) == 2
    err = capsys.readouterr().err
    assert "Open MPI's mpirun not found" in err and "HINT: make setup" in err, err
    assert recovery.main(["--mpirun", "/nonexistent/mpirun"]) == 2
    assert "/nonexistent/mpirun" in capsys.readouterr().err
