"""`--on-rank-loss shrink` under a real (one-node) Slurm: a rendered job loses a rank and the
survivor finishes inside the same job, launched by Open MPI's mpirun --with-ft ulfm.

Needs the one-node cluster (conftest.py) and Open MPI beside the venv (make setup; skipped
without it, a failure with MPITRAIN_REQUIRE_ULFM=1). The rank kills itself where
MPITRAIN_KILL_AT says (mpitrain/runtime/inject.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm import slurmctl
from tests.slurm.test_cluster import job_env, log_of, render

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]


def test_shrink_job_loses_a_rank_and_finishes_in_the_job(cluster: Path, ulfm_mpirun: str) -> None:
    """2 ranks, launch rank 1 killed at step 4: the job runs on (no requeue), rank 0 finishes
    the epoch alone and the job completes with status 0."""
    work = cluster / "shrink"
    work.mkdir()
    script = render(work / "job.sbatch", "train-cpu", "--ntasks-per-node", "2",
                    "--on-rank-loss", "shrink", "--job-name", "shrink",
                    train=["--epochs", "1", "--no-progress", "--global-batch", "48",
                           "--summary-json", str(work / "summary.json")])
    job_environ = {**job_env(work), "MPITRAIN_KILL_AT": "1:4", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                   "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    info = slurmctl.wait_for(slurmctl.sbatch(script, cwd=work, env=job_environ), 140)
    log = log_of(work)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{log}"
    assert (f"{ulfm_mpirun} --with-ft ulfm --mca pml ob1 --mca async_mpi_finalize 1 --bind-to "
            "none -n 2") in log, log
    assert "did not finish" not in log, log  # rank 0 wrote MPITRAIN_DONE_FILE
    assert "lost rank 1 of 2; continuing on 1 ranks from step 4" in log, log
    assert "training step exited with status 0" in log, log
    summary = json.loads((work / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 29, summary
