"""Cost of a lost rank: ``python -m mpitrain.bench recovery``.

Trains the digits MLP on ``--ranks`` ranks through the real CLI (one launch per job, each with
a time limit) and kills launch rank ``--kill-rank`` with SIGKILL at ``--kill-step``
(``MPITRAIN_KILL_AT``, mpitrain/runtime/inject.py), two ways, side by side:

- ``shrink``: ``mpirun --with-ft ulfm ... --on-rank-loss shrink``; the survivors agree,
  shrink, rebuild and go on. Phases come from the kill's line (its time), the survivors'
  report (failure seen, agree, shrink, rebuild, state) and ``metrics.jsonl`` (the first step
  completed after the kill): detection = seen - kill; first step = that step's end - the
  state loaded; kill -> step = that step's end - kill.
- ``abort``: today's path, the same job with ``--on-rank-loss abort``: the kill ends it (kill
  -> job exit), then a relaunch with ``--resume auto`` from the newest checkpoint (relaunch ->
  its first completed step: launch, imports, data, checkpoint load). A requeue's queue wait
  is not counted.

Lost work: the steps trained again, kill step - the step continued from (0 from memory; with
``--shard gradients`` the shrink path also reloads the checkpoint), times a median step
(shrink: the job's before the kill; abort: the relaunch's, as the killed job's metrics die
unwritten). Total = kill -> next completed step + lost work: when training is
back where it was killed. Medians over ``--repeat`` trials. Results: docs/robustness.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpitrain.runtime.launch import (
    ULFM_PREFIX,
    find_mpiexec,
    find_ulfm_mpirun,
    launch_env,
    mpiexec_command,
    ulfm_command,
)

KILL = re.compile(r"fault injection: launch rank (\d+) killed at step (\d+) \((\w+)\) "
                  r"t=([0-9.]+)")
REPORT = re.compile(r"lost ranks? ([0-9, ]+) of (\d+); continuing on (\d+) ranks from step "
                    r"(\d+) \((.*?)\); failure seen t=([0-9.]+), agree ([0-9.]+) s, shrink "
                    r"([0-9.]+) s, rebuild ([0-9.]+) s, state ([0-9.]+) s")
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+),")
#: (key, label) of the table's rows, in order; "-" where a path has no such phase
ROWS = (
    ("detect_s", "detection (kill -> failure seen)"),
    ("agree_s", "agreement"),
    ("shrink_s", "shrink"),
    ("rebuild_s", "rebuild"),
    ("state_s", "state reload"),
    ("first_step_s", "first step (state -> step done)"),
    ("exit_s", "kill -> job exit"),
    ("startup_s", "relaunch -> first step done"),
    ("recovery_s", "kill -> next completed step"),
    ("lost_steps", "lost steps (trained again)"),
    ("lost_s", "lost work (steps x median step)"),
    ("step_s", "median step"),
    ("total_s", "total"),
)


class BenchError(RuntimeError):
    """A job of the benchmark failed; the message names the command and its output."""


@dataclass
class Job:
    """One finished launch: exit code, output, wall-clock start and end (``time.time()``)."""

    rc: int
    out: str
    started: float
    ended: float


def run_job(cmd: list[str], env: dict[str, str], timeout: float) -> Job:
    """Run ``cmd`` in its own session; past ``timeout`` kill it and raise BenchError."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = end_session(proc)
        raise BenchError(f"timed out after {timeout:.0f} s (a hang): {' '.join(cmd)}\n"
                         f"{out[-3000:]}") from None
    return Job(proc.returncode, out, started, time.time())


def end_session(proc: subprocess.Popen[str]) -> str:
    """End a launch past its limit: SIGTERM the launcher (it ends its ranks), then SIGKILL
    whatever is left of the session it leads (ranks sit in process groups of their own)."""
    proc.terminate()
    try:
        return proc.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        pass
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == proc.pid:
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone meanwhile
            continue
    return proc.communicate()[0]


def fail(what: str, cmd: list[str], job: Job) -> BenchError:
    """A BenchError saying what was missing, with the command and its output's tail."""
    return BenchError(f"{what} (exit {job.rc}): {' '.join(cmd)}\n--- output\n{job.out[-4000:]}")


def parse_kill(text: str) -> tuple[int, int, float] | None:
    """The fault injection's (launch rank, step, unix time), or None."""
    m = KILL.search(text)
    return (int(m[1]), int(m[2]), float(m[4])) if m else None


def parse_report(text: str) -> dict[str, Any] | None:
    """The survivors' report: step continued from, its source, seen time and phases."""
    m = REPORT.search(text)
    if m is None:
        return None
    return {"lost": [int(r) for r in m[1].split(",")], "old_size": int(m[2]),
            "size": int(m[3]), "step": int(m[4]), "source": m[5], "seen": float(m[6]),
            "agree_s": float(m[7]), "shrink_s": float(m[8]), "rebuild_s": float(m[9]),
            "state_s": float(m[10])}


def parse_resumed(text: str) -> int:
    """The step a relaunch resumed from (0: it started fresh)."""
    m = RESUMED.search(text)
    return int(m[2]) if m else 0


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of ``run_dir/metrics.jsonl`` (those with a ``unix`` time)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "unix" in r and "step" in r]


def median_step(records: list[dict[str, Any]], before: float) -> float:
    """Median seconds between consecutive completed steps ending before ``before``."""
    ends = [r["unix"] for r in records if r["unix"] < before]
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    if not gaps:
        raise BenchError(f"fewer than 2 steps before the kill ({len(ends)}): raise --kill-step")
    return float(statistics.median(gaps))


def first_after(records: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The first step record completed after unix time ``t``."""
    return next((r for r in sorted(records, key=lambda r: r["unix"]) if r["unix"] > t), None)


def train_args(a: argparse.Namespace, shard: str, ckpt: Path, run_dir: Path) -> list[str]:
    """The CLI arguments every job of one configuration shares."""
    length = ["--max-steps", str(a.max_steps)] if a.max_steps else []
    return ["-m", "mpitrain", "--no-progress", "--global-batch", str(a.global_batch),
            "--epochs", str(a.epochs), *length, "--shard", shard, "--seed", "0",
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(a.checkpoint_every),
            "--run-dir", str(run_dir)]


def kill_env(a: argparse.Namespace) -> dict[str, str]:
    """The ranks' environment with the kill of ``--kill-rank`` at ``--kill-step``."""
    return launch_env({"MPITRAIN_KILL_AT": f"{a.kill_rank}:{a.kill_step}"})


def shrink_trial(a: argparse.Namespace, mpirun: str, shard: str, work: Path) -> dict[str, Any]:
    """One shrink job: the kill survived inside the job; its phases."""
    cmd = [*ulfm_command(a.ranks, mpirun), sys.executable,
           *train_args(a, shard, work / "ckpt", work / "run"), "--on-rank-loss", "shrink"]
    job = run_job(cmd, kill_env(a), a.timeout)
    kill, report = parse_kill(job.out), parse_report(job.out)
    if job.rc != 0 or kill is None or report is None:
        raise fail("the shrink job did not survive the kill", cmd, job)
    records = step_records(work / "run")
    after = first_after(records, kill[2])
    if after is None:
        raise fail("no step completed after the kill in metrics.jsonl", cmd, job)
    loaded = report["seen"] + sum(report[k] for k in ("agree_s", "shrink_s", "rebuild_s",
                                                      "state_s"))
    step_s = median_step(records, kill[2])
    lost = kill[1] - report["step"]
    recovery = after["unix"] - kill[2]
    return {"detect_s": report["seen"] - kill[2],
            **{k: report[k] for k in ("agree_s", "shrink_s", "rebuild_s", "state_s")},
            "first_step_s": after["unix"] - loaded, "recovery_s": recovery,
            "lost_steps": lost, "lost_s": lost * step_s, "step_s": step_s,
            "total_s": recovery + lost * step_s, "continued_from": report["source"],
            "survivors": report["size"]}


def abort_trial(a: argparse.Namespace, launch: list[str], shard: str,
                work: Path) -> dict[str, Any]:
    """Today's path: the kill ends the job; a relaunch resumes from the newest checkpoint."""
    cmd = [*launch, sys.executable, *train_args(a, shard, work / "ckpt", work / "run")]
    job = run_job(cmd, kill_env(a), a.timeout)
    kill = parse_kill(job.out)
    if job.rc == 0 or kill is None:
        raise fail("the aborting job was not ended by the kill", cmd, job)
    again = [*launch, sys.executable,
             *train_args(a, shard, work / "ckpt", work / "relaunch"), "--resume", "auto"]
    job2 = run_job(again, launch_env({"MPITRAIN_KILL_AT": ""}), a.timeout)
    records = step_records(work / "relaunch")
    if job2.rc != 0 or not records:
        raise fail("the relaunch with --resume auto failed", again, job2)
    first = min(r["unix"] for r in records)
    step_s = median_step(records, float("inf"))  # (the killed job's metrics were not flushed)
    lost = kill[1] - parse_resumed(job2.out)
    recovery = (job.ended - kill[2]) + (first - job2.started)
    return {"exit_s": job.ended - kill[2], "startup_s": first - job2.started,
            "recovery_s": recovery, "lost_steps": lost, "lost_s": lost * step_s,
            "step_s": step_s, "total_s": recovery + lost * step_s,
            "continued_from": f"checkpoint step {kill[1] - lost}"}


def summarize(path: str, shard: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: medians of the numeric fields over the trials that completed, how many
    failed, and the trials themselves (a failed one holds its ``error``)."""
    done = [t for t in trials if "error" not in t]
    row: dict[str, Any] = {"path": path, "shard": shard, "trials": trials,
                           "failed": len(trials) - len(done),
                           "continued_from": done[0]["continued_from"] if done else None}
    if done:
        row.update({k: float(statistics.median(t[k] for t in done))
                    for k, _ in ROWS if k in done[0]})
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Phases down, one column per (path, shard); the ratio abort / shrink of each shard."""
    width = 36
    head = "".join(f"{r['path'] + ' ' + r['shard']:>17}" for r in rows)
    lines = [f"{'seconds (median)':<{width}}{head}"]
    for key, label in ROWS:
        cells = []
        for r in rows:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.0f}" if key == "lost_steps"
                         else f"{v:.3f}")
        lines.append(f"{label:<{width}}" + "".join(f"{c:>17}" for c in cells))
    lines.append(f"{'failed trials':<{width}}" + "".join(f"{r['failed']:>17}" for r in rows))
    for shard, ratio in ratios(rows).items():
        lines.append(f"total abort / shrink ({shard}): {ratio:.1f}x")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """shard -> abort's total / shrink's total (where both ran)."""
    got = {(r["path"], r["shard"]): r["total_s"] for r in rows if "total_s" in r}
    return {s: got[("abort", s)] / got[("shrink", s)] for p, s in got
            if p == "shrink" and ("abort", s) in got and got[(p, s)] > 0}


def machine(mpirun: str) -> dict[str, Any]:
    """This machine, its load and the Open MPI used, for the record."""
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        version = "unknown"
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "mpi": version,
            "python": platform.python_version()}


def parse(argv: list[str]) -> argparse.Namespace:
    """The bench's options, checked."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=4)
    p.add_argument("--kill-step", type=int, default=15, help="steps done when the rank dies")
    p.add_argument("--kill-rank", type=int, default=1, help="launch rank killed")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (default: --kill-step + 5; 0: --epochs)")
    p.add_argument("--global-batch", type=int, default=48)
    p.add_argument("--shard", nargs="+", choices=("none", "gradients"), default=["none"],
                   help="gradients: ZeRO-2, state reloaded from the checkpoint on both paths")
    p.add_argument("--paths", nargs="+", choices=("shrink", "abort"),
                   default=["shrink", "abort"])
    p.add_argument("--abort-launch", choices=("openmpi", "mpiexec"), default="openmpi",
                   help="today's path under Open MPI's mpirun (no --with-ft, the same library "
                        "as shrink) or the default mpiexec (MPICH in make setup's venv)")
    p.add_argument("--repeat", type=int, default=1, help="trials per path (medians)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    p.add_argument("--mpirun", help="Open MPI's mpirun (default: make setup's)")
    p.add_argument("--out", type=Path, help="keep the jobs' directories here")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    a = p.parse_args(argv)
    if not 0 <= a.kill_rank < a.ranks or a.ranks < 2:
        p.error(f"--kill-rank {a.kill_rank} must name one of --ranks {a.ranks} (at least 2)")
    if a.max_steps is None:
        a.max_steps = a.kill_step + 5
    if a.kill_step < 3 or (a.max_steps and a.max_steps <= a.kill_step):
        p.error("--kill-step must be at least 3 and below --max-steps")
    return a


def main(argv: list[str]) -> int:
    """Run the trials; print the table; write JSON."""
    a = parse(argv)
    mpirun = a.mpirun or find_ulfm_mpirun()
    if mpirun is None or not Path(mpirun).exists():
        print(f"bench recovery: Open MPI's mpirun not found ({mpirun or ULFM_PREFIX / 'bin'}); "
              "--on-rank-loss shrink needs `mpirun --with-ft ulfm`. HINT: make setup installs "
              f"Open MPI in {ULFM_PREFIX}, or pass --mpirun PATH", file=sys.stderr)
        return 2
    launch = ([mpirun, "--oversubscribe", "-n", str(a.ranks)] if a.abort_launch == "openmpi"
              else mpiexec_command(a.ranks, find_mpiexec()))
    print(f"recovery from a lost rank: digits MLP, {a.ranks} ranks, launch rank {a.kill_rank} "
          f"killed at step {a.kill_step}, checkpoint every {a.checkpoint_every}, shard "
          f"{'/'.join(a.shard)}, {a.repeat} trial(s), abort path via {launch[0]}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        base = a.out or Path(tmp)
        for shard in a.shard:
            trials: dict[str, list[dict[str, Any]]] = {p: [] for p in a.paths}
            for i in range(a.repeat):  # the paths take turns: the same machine noise
                for path in a.paths:
                    trials[path].append(trial(a, path, shard, base / f"{shard}-{path}-{i}",
                                              mpirun, launch))
                    got = trials[path][-1]
                    print(f"  {shard} {path} trial {i + 1}: " + (
                        f"total {got['total_s']:.3f} s" if "error" not in got
                        else "FAILED: " + got["error"].splitlines()[0]), flush=True)
            rows += [summarize(p, shard, t) for p, t in trials.items()]
    failed = sum(r["failed"] for r in rows)
    print(table(rows))
    print("total: kill -> next completed step + lost work (when training is back where it "
          "was killed); a requeue's wait in the queue is not counted")
    if a.json:
        result = {"benchmark": "recovery", "machine": machine(mpirun), "argv": argv,
                  "config": {k: (str(v) if isinstance(v, Path) else v)
                             for k, v in vars(a).items()},
                  "abort_launcher": launch[0], "rows": rows, "ratios": ratios(rows),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print(f"bench recovery: {failed} trial(s) failed; their errors are in the JSON "
              "(--json) and above", file=sys.stderr)
    return 1 if failed else 0


def trial(a: argparse.Namespace, path: str, shard: str, work: Path, mpirun: str,
          launch: list[str]) -> dict[str, Any]:
    """One trial of ``path``; a job that failed gives ``{"error": ...}`` (printed to stderr)."""
    try:
        if path == "shrink":
            return shrink_trial(a, mpirun, shard, work)
        return abort_trial(a, launch, shard, work)
    except BenchError as exc:
        print(f"bench recovery: {exc}", file=sys.stderr)
        return {"error": str(exc)[-6000:]}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
