"""The batch script's requeue decisions on a real Slurm cluster, with a stub in place of python.

The stub exits 99 (mpitrain's "preempted after a checkpoint") unless it was started with
``--resume auto``, so these tests cost seconds, not training runs. The full preemption path
with real training and a bitwise comparison is in test_cluster.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm import slurmctl

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/bin/bash
# stands in for python: records how it was started; "preempted" (99) unless resuming
{ printf '%s|' "$@"; echo "restart=${SLURM_RESTART_COUNT:-0} cont=${MPITRAIN_CONTINUATION:-0}"; } \\
    >> "$REQUEUE_CALLS"
case " $* " in *" --resume auto "*) exit 0 ;; *) exit 99 ;; esac
"""


def submit(work: Path, name: str, *, script_text: str = STUB, **extra_env: str) -> str:
    """Render train-cpu with a stub (``script_text``) as python and submit it; return the id."""
    work.mkdir()
    stub = work / "fakepy"
    stub.write_text(script_text)
    stub.chmod(0o755)
    script = work / "job.sbatch"
    proc = subprocess.run(
        [sys.executable, "-m", "mpitrain", "slurm", "render", "train-cpu", "--job-name", name,
         "--python", str(stub), "--time", "5", "--output", str(script), "--", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPITRAIN_", "SLURM_"))}
    env.update(REQUEUE_CALLS=str(work / "calls"), **extra_env)
    return slurmctl.sbatch(script, cwd=work, env=env)


def calls(work: Path) -> list[str]:
    return (work / "calls").read_text().splitlines()


def log(work: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(work.glob("*.out")))


def wait_requeued(job: str, work: Path, timeout: float = 60) -> None:
    """Wait until ``job`` is back in the queue (PENDING after its first restart)."""
    deadline = time.monotonic() + timeout
    info = slurmctl.job_info(job)
    while info.get("Restarts") != "1" or info.get("JobState") != "PENDING":
        assert time.monotonic() < deadline, f"not requeued: {info}\n{log(work)}"
        assert info.get("JobState") not in slurmctl.FINAL, f"{info}\n{log(work)}"
        time.sleep(0.2)
        info = slurmctl.job_info(job)


def test_scontrol_requeue_then_resume(cluster: Path) -> None:
    work = cluster / "requeue-scontrol"
    job = submit(work, "rq-scontrol")
    wait_requeued(job, work)
    assert "requeued job" in log(work)
    slurmctl.release_requeued(job)  # what the ~120 s requeue delay guarantees on a real cluster
    info = slurmctl.wait_for(job, 60)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log(work)}\n{slurmctl.slurmd_log_tail()}"
    first, second = calls(work)
    ckpt = f"--checkpoint-dir|checkpoints/rq-scontrol-{job}|"
    assert first == f"-m|mpitrain|--epochs|1|{ckpt}restart=0 cont=0"
    assert second == f"-m|mpitrain|--epochs|1|{ckpt}--resume|auto|restart=1 cont=0"


def test_continuation_job_fallback(cluster: Path) -> None:
    work = cluster / "requeue-sbatch"
    job = submit(work, "rq-sbatch", MPITRAIN_REQUEUE="sbatch")
    assert slurmctl.wait_for(job, 60)["JobState"] == "COMPLETED", log(work)
    # the script printed sbatch's answer for the continuation job
    submitted = re.findall(r"^Submitted batch job (\d+)$", log(work), re.M)
    assert len(submitted) == 1, log(work)
    follow = submitted[0]
    assert slurmctl.job_info(follow)["Dependency"] in (f"afterany:{job}(unfulfilled)", "(null)")
    info = slurmctl.wait_for(follow, 60)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log(work)}"
    first, second = calls(work)
    ckpt = f"--checkpoint-dir|checkpoints/rq-sbatch-{job}|"
    assert first == f"-m|mpitrain|--epochs|1|{ckpt}restart=0 cont=0"
    # new job id, same checkpoint directory, counted through MPITRAIN_CONTINUATION
    assert second == f"-m|mpitrain|--epochs|1|{ckpt}--resume|auto|restart=0 cont=1"


def test_no_requeue_at_the_limit(cluster: Path) -> None:
    work = cluster / "requeue-limit"
    job = submit(work, "rq-limit", MPITRAIN_MAX_RESTARTS="0")
    info = slurmctl.wait_for(job, 60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "99:0", f"{info}\n{log(work)}"
    assert info["Restarts"] == "0" and len(calls(work)) == 1
    assert "not requeueing" in log(work)


SIGNALLED_STUB = """#!/bin/bash
# stands in for python: waits for the forwarded USR1, then exits 143 the way a rank killed by
# srun --kill-on-bad-exit does after its peers' 99; with WRITE_CKPT=1 it first completes a
# checkpoint (touches CHECKPOINT_DIR/latest), as the ranks had
{ printf '%s|' "$@"; echo "restart=${SLURM_RESTART_COUNT:-0}"; } >> "$REQUEUE_CALLS"
case " $* " in *" --resume auto "*) exit 0 ;; esac
while [ $# -gt 0 ]; do [ "$1" = --checkpoint-dir ] && ckpt=$2; shift; done
on_usr1() {
    if [ "${WRITE_CKPT:-0}" = 1 ]; then mkdir -p "$ckpt"; touch "$ckpt/latest"; fi
    exit 143
}
trap on_usr1 USR1
touch "$REQUEUE_CALLS.ready"
for _ in $(seq 600); do sleep 0.1; done
exit 1
"""


@pytest.mark.parametrize("checkpointed", [True, False])
def test_status_143_after_signal_is_preempted_only_with_a_new_checkpoint(
    cluster: Path, checkpointed: bool
) -> None:
    """Ranks on several nodes: srun reports 143 (a rank terminated while exiting 99). The script
    requeues only when a checkpoint was written since the forwarded signal."""
    name = f"rq-143-{'ckpt' if checkpointed else 'none'}"
    work = cluster / name
    job = submit(work, name, script_text=SIGNALLED_STUB, WRITE_CKPT="1" if checkpointed else "0")
    ready = work / "calls.ready"
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, f"stub never started\n{log(work)}"
        assert slurmctl.job_info(job).get("JobState") not in slurmctl.FINAL, log(work)
        time.sleep(0.1)
    slurmctl.run("scancel", "--signal=USR1", "--batch", job)
    if not checkpointed:
        info = slurmctl.wait_for(job, 60)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{log(work)}"
        assert "training step exited with status 143" in log(work)
        assert "treating it as preempted" not in log(work)
        return
    wait_requeued(job, work)
    assert "status 143 after a forwarded signal, with a checkpoint written since" in log(work)
    slurmctl.release_requeued(job)
    info = slurmctl.wait_for(job, 60)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log(work)}"
