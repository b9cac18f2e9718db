"""Submit and follow jobs on the local test cluster (tests/slurm/cluster.sh) from Python."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
#: cluster.sh exit code for "cannot run here" (not root, no apt-get, install failed)
CANNOT_RUN = 3


def run(*cmd: str, check: bool = True) -> str:
    """Run a Slurm client command and return its stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def sbatch(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Submit ``script``; return the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={cwd}", *args, str(script)],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """Return ``scontrol show job`` fields (first record) as a dict ({} when unknown)."""
    out = run("scontrol", "-o", "show", "job", job, check=False)
    info: dict[str, str] = {}
    for word in out.splitlines()[0].split() if out.strip() else []:
        key, _, value = word.partition("=")
        info.setdefault(key, value)
    return info


def states(job: str) -> list[str]:
    """Return the states of a job (several for an array)."""
    out = run("scontrol", "-o", "show", "job", job, check=False)
    return [w.split("=", 1)[1] for line in out.splitlines() for w in line.split()
            if w.startswith("JobState=")]


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


def wait_for(job: str, timeout: float, *, want: set[str] | None = None) -> dict[str, str]:
    """Wait until every record of ``job`` is in a final state (or one of ``want``)."""
    targets = want or FINAL
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = states(job)
        if st and all(s in targets for s in st):
            return job_info(job)
        time.sleep(0.25)
    raise TimeoutError(f"job {job} still {states(job)} after {timeout}s: {job_info(job)}")


def wait_stepds_gone(job: str, timeout: float = 30) -> None:
    """Wait until no slurmstepd of ``job`` runs (a released requeue must not meet the old one).

    The new incarnation reuses step ids (J.batch, J.0): an old slurmstepd still tearing down
    removes the new step's socket, and srun then fails in PMI ("failed to send temp kvs").
    """
    deadline = time.monotonic() + timeout
    tag = f"slurmstepd: [{job}."
    while time.monotonic() < deadline:
        procs = run("ps", "-eo", "args", check=False)
        if not any(line.startswith(tag) for line in procs.splitlines()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"slurmstepd of job {job} still running after {timeout}s")


#: seconds between the old incarnation's end and the release of a requeued job
REVOKE_GAP_S = 2.5


def release_requeued(job: str) -> None:
    """Start a requeued (PENDING, BeginTime in ~120 s) job now, the way Slurm's delay would.

    Two races hide behind Slurm's own requeue delay: the old slurmstepd tearing down (see
    :func:`wait_stepds_gone`), and slurmd's revoked-credential check, which compares whole
    seconds: a credential issued in the same second as the requeue's revoke is refused and
    the new incarnation fails at once (exit 1, RunTime 0, no output). Waiting a couple of
    seconds after the old steps are gone avoids both.
    """
    wait_stepds_gone(job)
    time.sleep(REVOKE_GAP_S)
    run("scontrol", "update", f"JobId={job}", "StartTime=now")


def slurmd_log_tail(lines: int = 40) -> str:
    """Return the end of the test cluster's slurmd log (for failure messages)."""
    log = Path("/tmp/mpitrain-slurm/log/slurmd.log")
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no slurmd log: {exc})"
