"""A Lightning script (tests/slurm/lightning_job.py) through `slurm render train-cpu --script`
on a real Slurm cluster: preempted (USR1 to the batch script), checkpointed by MPIStrategy,
requeued, resumed from its hpc_ckpt_N.ckpt, finished."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.slurm import slurmctl
from tests.slurm.test_cluster import finish, job_env, log_of, render

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

JOB = Path(__file__).resolve().parent / "lightning_job.py"


def test_lightning_script_preempted_requeued_resumed(cluster: Path) -> None:
    """USR1 -> every rank stops at one step, ZeRO-2 hpc_ckpt_1.ckpt, exit 99 -> scontrol
    requeue -> the script resumes it (ckpt_path="hpc") at that step and trains to the end."""
    work = cluster / "lightning"
    work.mkdir()
    ckpt = work / "ckpt dir"
    script = render(work / "job.sbatch", "train-cpu", "--ntasks-per-node", "2",
                    "--job-name", "lit", "--script", str(JOB), "--checkpoint-dir", str(ckpt),
                    train=["--out", str(work / "result.json"), "--max-epochs", "2",
                           "--shard", "gradients", "--step-sleep", "0.3"])
    job = slurmctl.sbatch(script, cwd=work, env=job_env(work))
    deadline = time.monotonic() + 240  # two ranks importing torch and Lightning on 2 cores
    while "lightning_job: step 3" not in log_of(work):
        log = log_of(work)
        assert time.monotonic() < deadline and "exited with status" not in log, log
        time.sleep(0.2)
    slurmctl.run("scancel", "--signal=USR1", "--batch", job)
    info = slurmctl.wait_for(job, 120, want={"PENDING", *slurmctl.FINAL})
    log = log_of(work)
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", f"{info}\n{log}"
    m = re.search(r"mpitrain: preempted \(rank \d: SIGUSR1(, rank \d: SIGUSR1)?\) at step "
                  r"(\d+): saved '.*hpc_ckpt_1\.ckpt'", log)
    assert m is not None, log
    stopped = int(m.group(2))
    assert (ckpt / "hpc_ckpt_1.ckpt" / "lightning.pt").is_file(), log
    assert "training step exited with status 99" in log and "requeued job" in log, log
    slurmctl.release_requeued(job)  # what the ~120 s requeue delay guarantees on a real cluster
    info = finish(job, 240)
    log = log_of(work)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{slurmctl.slurmd_log_tail()}"
    assert "restart 1" in log, log
    result = json.loads((work / "result.json").read_text())
    assert result["resumed"] == "hpc" and result["ranks"] == 2, result
    assert result["start"]["global_step"] == stopped > 0, (result["start"], stopped)
    assert result["end_epoch"] == 2 and result["end_step"] > stopped, result
