"""Slurm templates against a real one-node Slurm cluster (slurmctld + slurmd + munge).

The session fixture starts the cluster with tests/slurm/cluster.sh (installing Slurm with
apt-get when missing) and stops what it started. Tests skip where that cannot work (not root,
no apt-get); with MPITRAIN_REQUIRE_SLURM=1 (CI) they fail instead.
Run locally (as root): `.venv/bin/pytest -m slurm tests/slurm -v`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm import slurmctl

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
HELLO = Path(__file__).resolve().parent / "hello_mpi.py"
PY = sys.executable
#: enough digits epochs for >= 95% test accuracy with 2 ranks
EPOCHS = "10"


def job_env(workdir: Path) -> dict[str, str]:
    """Environment for submitted jobs: this venv's python first on PATH, one thread per rank."""
    bindir = str(Path(PY).parent)
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MPITRAIN_", "SLURM_"))}
    out.update(
        PATH=f"{bindir}:{out.get('PATH', '/usr/bin:/bin')}",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        # one cache per job: concurrent jobs building the same digits cache race (trainer bug)
        MPITRAIN_CACHE=str(workdir / "cache"),
    )
    return out


def render(out: Path, template: str, *opts: str, train: list[str] | None = None) -> Path:
    """Render a template with the real CLI into ``out``."""
    cmd = [PY, "-m", "mpitrain", "slurm", "render", template, "--python", PY, "--time", "10",
           "--output", str(out), *opts]
    if train is not None:
        cmd += ["--", *train]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out


def finish(job: str, timeout: float = 120) -> dict[str, str]:
    """Wait for a job and return its final scontrol record."""
    return slurmctl.wait_for(job, timeout)


def log_of(workdir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(workdir.glob("*.out")))


def test_srun_pmi2_and_mpirun_give_one_world(cluster: Path) -> None:
    """srun --mpi=pmi2 and mpirun build one 2-rank world; the trainer refuses srun --mpi=none."""
    work = cluster / "hello"
    work.mkdir()
    script = work / "hello.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2 --output=hello.out\n"
        f"srun --mpi=pmi2 {PY} {HELLO} srun.json\n"
        f"mpirun -n \"$SLURM_NTASKS\" {PY} {HELLO} mpirun.json\n"
        # no PMI: two separate 1-rank worlds; the trainer must refuse with the --mpi= hint
        f"srun --mpi=none {PY} -m mpitrain --max-steps 1 --no-progress > mismatch.err 2>&1; "
        "echo \"rc=$?\" >> mismatch.err\n"
    )
    info = finish(slurmctl.sbatch(script, cwd=work, env=job_env(work)), 60)
    assert info["JobState"] == "COMPLETED", log_of(work)
    for name in ("srun.json", "mpirun.json"):
        assert json.loads((work / name).read_text()) == {"world_size": 2, "ranks": [0, 1]}
    err = (work / "mismatch.err").read_text()
    assert "MPI world size is 1 but SLURM_NTASKS=2" in err and "srun --mpi=pmi2" in err, err
    assert "rc=0" not in err and "mpitrain: done" not in err, err


def test_train_cpu_template_srun_and_mpirun(cluster: Path) -> None:
    """The rendered CPU template trains digits with 2 tasks via srun and via mpirun (>= 95%)."""
    jobs = {}
    for launcher in ("srun", "mpirun"):
        work = cluster / f"train-{launcher}"
        work.mkdir()
        script = render(work / "job.sbatch", "train-cpu", "--ntasks-per-node", "2",
                        "--launcher", launcher, "--job-name", f"digits-{launcher}",
                        train=["--epochs", EPOCHS, "--no-progress",
                               "--summary-json", str(work / "summary.json")])
        jobs[launcher] = (work, slurmctl.sbatch(script, cwd=work, env=job_env(work)))
    for launcher, (work, job) in jobs.items():
        info = finish(job, 150)
        assert info["JobState"] == "COMPLETED", f"{launcher}: {info}\n{log_of(work)}"
        summary = json.loads((work / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert summary["test_accuracy"] >= 0.95, summary


def _final_model(ckpt_dir: Path) -> dict[str, object]:
    import torch

    latest = sorted(ckpt_dir.glob("step-*.pt"))[-1]
    state = torch.load(latest, map_location="cpu", weights_only=False)
    return dict(state["model"])


def test_preemption_requeue_resume_bitwise(cluster: Path) -> None:
    """USR1 to the batch script -> checkpoint, exit 99, requeue, resume, bitwise-equal result."""
    import torch

    train = ["--epochs", "3", "--no-progress", "--straggler-ms", "40"]
    jobs = {}
    for name in ("preempted", "reference"):
        work = cluster / name
        work.mkdir()
        script = render(work / "job.sbatch", "train-cpu", "--ntasks-per-node", "2",
                        "--job-name", name, "--checkpoint-dir", str(work / "ckpt"),
                        train=[*train, "--summary-json", str(work / "summary.json")])
        jobs[name] = (work, slurmctl.sbatch(script, cwd=work, env=job_env(work)))
    work, job = jobs["preempted"]
    deadline = time.monotonic() + 90
    while "epoch   1/3" not in log_of(work):  # mid-run: after the first epoch
        log = log_of(work)
        assert time.monotonic() < deadline and "exited with status" not in log, log
        time.sleep(0.2)
    slurmctl.run("scancel", "--signal=USR1", "--batch", job)
    info = slurmctl.wait_for(job, 90, want={"PENDING", *slurmctl.FINAL})
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", f"{info}\n{log_of(work)}"
    assert list((work / "ckpt").glob("step-*.pt")), "no checkpoint written on preemption"
    slurmctl.release_requeued(job)  # what the ~120 s requeue delay guarantees on a real cluster
    info = finish(job, 120)
    log = log_of(work)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}\n{slurmctl.slurmd_log_tail()}"
    assert "restart 1" in log and "exited with status 99" in log, log
    ref_work, ref_job = jobs["reference"]
    assert finish(ref_job, 60)["JobState"] == "COMPLETED", log_of(ref_work)
    got, want = _final_model(work / "ckpt"), _final_model(ref_work / "ckpt")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key  # type: ignore[arg-type]


def test_sweep_array_and_summary(cluster: Path) -> None:
    """A 3-task job array trains one grid row each; sweep-summary lists 3 results."""
    work = cluster / "sweep"
    work.mkdir()
    grid = work / "grid.csv"
    grid.write_text("lr,seed\n0.05,0\n0.1,1\n0.02,2\n")
    script = render(work / "job.sbatch", "sweep", "--ntasks-per-node", "1", "--grid", str(grid),
                    "--sweep-dir", str(work / "runs"), "--job-name", "sweep",
                    train=["--epochs", "2", "--no-progress"])
    job = slurmctl.sbatch(script, cwd=work, env=job_env(work))
    finish(job, 150)
    assert set(slurmctl.states(job)) == {"COMPLETED"}, log_of(work)
    proc = subprocess.run([PY, "-m", "mpitrain", "sweep-summary", str(work / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for i in range(3):
        assert f"task-{i}" in proc.stdout, proc.stdout


def _manifest(path: Path) -> dict[str, object]:
    data = json.loads((path / "manifest.json").read_text())
    data["params"].pop("out", None)  # the output path itself differs
    return dict(data)


def test_preprocess_matches_local_conversion(cluster: Path) -> None:
    """preprocess.sbatch (2 ranks) writes the same manifest as a local 1-process conversion."""
    work = cluster / "preprocess"
    work.mkdir()
    args = ["--sklearn", "digits", "--samples-per-shard", "300", "--name", "digits"]
    script = render(work / "job.sbatch", "preprocess", "--ntasks-per-node", "2",
                    "--job-name", "prep", train=[*args, "--out", str(work / "slurm-data")])
    job = slurmctl.sbatch(script, cwd=work, env=job_env(work))
    local = subprocess.run([PY, "-m", "data_tools", "convert", *args, "--out",
                            str(work / "local-data")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert finish(job, 120)["JobState"] == "COMPLETED", log_of(work)
    assert _manifest(work / "slurm-data") == _manifest(work / "local-data")
    shards = sorted(p.name for p in (work / "local-data").glob("*.h5"))
    assert shards and shards == sorted(p.name for p in (work / "slurm-data").glob("*.h5"))
    for name in shards:  # byte-identical shards, written by 2 ranks vs 1 process
        got, want = work / "slurm-data" / name, work / "local-data" / name
        assert got.read_bytes() == want.read_bytes(), name


def test_injected_values_run_no_command(cluster: Path) -> None:
    """Hostile values are rejected or quoted: the submitted job creates no marker file."""
    work = cluster / "inject"
    work.mkdir()
    marker = work / "pwned"
    bad_name = f'x"; touch {marker}; "'
    proc = subprocess.run([PY, "-m", "mpitrain", "slurm", "render", "train-cpu", "--job-name",
                           bad_name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:  # accepted: then it must be harmless when submitted
        (work / "name.sbatch").write_text(proc.stdout)
        finish(slurmctl.sbatch(work / "name.sbatch", cwd=work, env=job_env(work)), 60)
    else:
        assert proc.returncode == 2 and "job-name" in proc.stderr, proc.stderr
    # values that do reach the shell: quoted, so they stay data
    hostile = f"$(touch {marker})`touch {marker}`'\"; touch {marker}\n"
    ckpt = work / f"ck-$(touch {marker})"
    script = render(work / "q.sbatch", "train-cpu", "--ntasks-per-node", "1", "--job-name", "q",
                    "--checkpoint-dir", str(ckpt),
                    train=["--max-steps", "2", "--no-progress", "--summary-json",
                           str(work / "summary.json"), "--run-dir", str(work / "r;$(id)")])
    info = finish(slurmctl.sbatch(script, cwd=work, env=job_env(work)), 90)
    assert info["JobState"] == "COMPLETED", log_of(work)
    assert ckpt.is_dir() and (work / "r;$(id)").is_dir()
    rej = subprocess.run([PY, "-m", "mpitrain", "slurm", "render", "train-cpu", "--", hostile],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert rej.returncode == 2, rej.stdout  # a newline in a training argument is refused
    assert not marker.exists()
