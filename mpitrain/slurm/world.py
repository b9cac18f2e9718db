"""Facts about the Slurm job we run in, and the world-size check done at start-up."""

from __future__ import annotations

from collections.abc import Mapping

from mpitrain.errors import CommError, with_hint
from mpitrain.runtime import env

#: fact name -> env TABLE key
FACTS: dict[str, str] = {
    "job_id": "slurm_job_id",
    "step_id": "slurm_step_id",
    "nodelist": "slurm_nodelist",
    "procid": "slurm_procid",
    "localid": "slurm_localid",
    "ntasks": "slurm_ntasks",
    "restart_count": "slurm_restart_count",
    "array_task_id": "slurm_array_task_id",
}


def slurm_facts(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the Slurm facts that are set (empty outside Slurm)."""
    out: dict[str, str] = {}
    for name, key in FACTS.items():
        value = env.get(key, environ=environ)
        if value is not None:
            out[name] = value
    return out


def check_slurm_world(world_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise CommError when srun started ranks whose MPI world differs from SLURM_NTASKS.

    Checked only inside a job step launched by srun itself: under ``mpirun`` inside the
    allocation, Slurm's task count describes mpirun's proxies, not the MPI ranks.

    Raises:
        CommError: the world size differs from the task count.
        ConfigError: the task count is not a whole number (every rank reads the same value).
    """
    if env.get("slurm_step_id", environ=environ) is None:
        return
    if env.get("slurm_procid", environ=environ) is None:
        return
    if env.get("mpirun_markers", environ=environ) is not None:
        return
    ntasks = env.get_int("slurm_ntasks", environ=environ, minimum=1)
    if ntasks is None:
        return
    if ntasks == world_size:
        return
    procid = env.get("slurm_procid", environ=environ)
    job = env.get("slurm_job_id", environ=environ)
    step = env.get("slurm_step_id", environ=environ)
    msg = (
        f"rank {procid} of Slurm job {job} step {step}: MPI world size is {world_size} "
        f"but SLURM_NTASKS={ntasks}"
    )
    if world_size == 1:
        msg += " (srun started separate single-process MPI worlds)"
    raise CommError(
        with_hint(
            msg,
            "launch with the PMI your MPI speaks: srun --mpi=pmi2 (MPICH, Intel MPI, MVAPICH) "
            "or srun --mpi=pmix (Open MPI); `srun --mpi=list` shows the plugins, "
            "or use mpirun inside the allocation (MPITRAIN_LAUNCHER=mpirun)",
        )
    )
