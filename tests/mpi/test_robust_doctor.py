"""`mpitrain doctor` under mpiexec, and the srun-without-PMI mistake it must catch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpitrain.runtime.launch import launch_env

pytestmark = pytest.mark.mpi
ROOT = Path(__file__).resolve().parents[2]


def test_doctor_two_ranks_reports_both(mpirun, tmp_path: Path) -> None:
    report = tmp_path / "doctor.json"
    proc = mpirun(2, ["-m", "mpitrain", "doctor", "--json", str(report)], timeout=60)
    out = proc.stdout
    assert "world: 2 ranks on 1 node(s)" in out
    assert "MPI library: MPICH" in out and "thread level: MULTIPLE" in out
    assert "cuda-aware MPI: no CUDA device" in out  # CPU-only CI
    assert "OK: no problems found" in out
    data = json.loads(report.read_text())
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert [r["local_rank"] for r in data["ranks"]] == [0, 1]
    assert data["problems"] == []


@pytest.mark.parametrize(("per_node", "where"), [("2", "inside nodes"), ("1", "ACROSS nodes")])
def test_doctor_shows_the_model_parallel_grid(mpirun, per_node: str, where: str) -> None:
    proc = mpirun(4, ["-m", "mpitrain", "doctor", "--tensor-parallel", "2"], timeout=60,
                  extra_env={"MPITRAIN_RANKS_PER_NODE": per_node})
    assert f"grid: tensor 2 x pipeline 1 x data 2; tensor groups {where}" in proc.stdout
    assert "rank 3 on " in proc.stdout and "tensor 1, stage 0, replica 1" in proc.stdout
    bad = mpirun(2, ["-m", "mpitrain", "doctor", "--pipeline-stages", "3"], timeout=60,
                 check=False)
    assert bad.returncode == 1
    assert "2 ranks do not fill a grid of tensor 1 x pipeline 3" in bad.stdout


def test_srun_without_pmi_is_an_error_with_hint(mpiexec: str, tmp_path: Path) -> None:
    """What `srun -n 2` without --mpi does to MPICH: separate size-1 worlds (here: task 1's)."""
    procs = []
    for rank in (1,):
        child = launch_env(
            {
                "SLURM_JOB_ID": "42",
                "SLURM_STEP_ID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(rank),
                "MPITRAIN_CACHE": str(tmp_path),
            }
        )
        for var in [k for k in child if k.startswith(("PMI_", "MPI_LOCAL", "HYDI_", "OMPI_COMM"))]:
            del child[var]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mpitrain", "doctor"],
                cwd=ROOT,
                env=child,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for rank, p in zip((1,), procs, strict=True):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 1, out
        assert f"rank {rank} of Slurm job 42 step 0: MPI world size is 1 but SLURM_NTASKS=2" in out
        assert "HINT:" in out and "srun --mpi=pmi2" in out and "--mpi=pmix" in out
