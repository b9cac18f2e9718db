"""check_slurm_world / slurm_facts on simulated environments (no Slurm, no MPI)."""

from __future__ import annotations

import pytest

from mpitrain.errors import CommError, ConfigError
from mpitrain.slurm import check_slurm_world, slurm_facts

STEP = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}


def test_outside_slurm_or_batch_shell_is_not_checked() -> None:
    check_slurm_world(1, environ={})
    check_slurm_world(1, environ={"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4"})  # no step


def test_srun_world_must_match_ntasks() -> None:
    check_slurm_world(4, environ=STEP)
    with pytest.raises(CommError) as err:
        check_slurm_world(1, environ=STEP)
    msg = str(err.value)
    assert "rank 1 of Slurm job 42 step 0: MPI world size is 1 but SLURM_NTASKS=4" in msg
    assert "separate single-process MPI worlds" in msg
    assert "srun --mpi=pmi2" in msg and "srun --mpi=pmix" in msg
    with pytest.raises(CommError, match="world size is 2 but SLURM_NTASKS=4"):
        check_slurm_world(2, environ={**STEP, "SLURM_NPROCS": "9"})


@pytest.mark.parametrize("marker", ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE", "HYDI_CONTROL_FD"])
def test_mpirun_inside_allocation_is_not_checked(marker: str) -> None:
    # hydra/Open MPI proxies run as a 1-task step per node: SLURM_NTASKS counts proxies
    check_slurm_world(2, environ={**STEP, "SLURM_NTASKS": "1", marker: "2"})


def test_facts_from_the_table() -> None:
    env = {**STEP, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "1",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_LOCALID": "0"}
    assert slurm_facts(env) == {
        "job_id": "42", "step_id": "0", "nodelist": "n[1-2]", "procid": "1", "localid": "0",
        "ntasks": "4", "restart_count": "1", "array_task_id": "3",
    }
    assert slurm_facts({}) == {}


@pytest.mark.parametrize("value", ["four", " 4", "4\n", "-4", "+4", "4.0", "\u0664", "1_0"])
def test_malformed_ntasks_is_an_error_naming_the_variable(value: str) -> None:
    # before: int() accepted ' 4' and the Arabic-Indic digit, and 'four' skipped the check
    with pytest.raises(ConfigError) as err:
        check_slurm_world(4, environ={**STEP, "SLURM_NTASKS": value})
    msg = str(err.value)
    assert "SLURM_NTASKS" in msg and "HINT: " in msg and "\n" not in msg


def test_malformed_nprocs_fallback_is_named() -> None:
    env = {k: v for k, v in STEP.items() if k != "SLURM_NTASKS"}
    with pytest.raises(ConfigError, match="SLURM_NPROCS"):
        check_slurm_world(4, environ={**env, "SLURM_NPROCS": "x"})
