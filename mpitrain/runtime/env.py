"""The one table of environment variables mpitrain reads (Slurm, MPI launchers, our own).

Nothing else in the package reads ``os.environ`` directly: it calls :func:`get` with a key
of :data:`TABLE`. Values are read lazily, at call time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: logical key -> environment variable names, first one set wins
TABLE: dict[str, tuple[str, ...]] = {
    # Slurm
    "slurm_job_id": ("SLURM_JOB_ID",),
    "slurm_step_id": ("SLURM_STEP_ID",),
    "slurm_nodelist": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "slurm_procid": ("SLURM_PROCID",),
    "slurm_localid": ("SLURM_LOCALID",),
    "slurm_ntasks": ("SLURM_NTASKS", "SLURM_NPROCS"),
    "slurm_restart_count": ("SLURM_RESTART_COUNT",),
    "slurm_array_task_id": ("SLURM_ARRAY_TASK_ID",),
    "slurm_cpus_per_task": ("SLURM_CPUS_PER_TASK",),
    # set only when an mpirun (hydra / Open MPI) started the ranks inside a Slurm step
    "mpirun_markers": ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE", "HYDI_CONTROL_FD"),
    # launchers' node-local rank hints (used only for reporting; MPI decides)
    "launcher_local_rank": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
    # CUDA / vendor hints for CUDA-aware MPI
    "cuda_visible_devices": ("CUDA_VISIBLE_DEVICES",),
    "ompi_cuda_support": ("OMPI_MCA_opal_cuda_support",),
    "mpich_gpu_support": ("MPICH_GPU_SUPPORT_ENABLED",),
    "mpich_enable_gpu": ("MPIR_CVAR_ENABLE_GPU",),
    "mv2_use_cuda": ("MV2_USE_CUDA",),
    "ucx_tls": ("UCX_TLS",),
    # MPICH's own progress thread (--comm-progress mpi)
    "mpich_async_progress": ("MPIR_CVAR_ASYNC_PROGRESS",),
    # Open MPI's fault tolerance (set in every rank by `mpirun --with-ft ulfm`)
    "ompi_ft_enable": ("OMPI_MCA_mpi_ft_enable",),
    # the launcher's rank of this process (kept across a shrink; fault injection)
    "launcher_rank": ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"),
    "launcher_world_size": ("OMPI_COMM_WORLD_SIZE",),  # set by Open MPI's mpirun
    "mpi4py_libmpi": ("MPI4PY_LIBMPI",),
    # ours
    "kill_at": ("MPITRAIN_KILL_AT",),
    # rank 0 writes the summary there when training finished (the Slurm shrink template)
    "done_file": ("MPITRAIN_DONE_FILE",),
    "cache": ("MPITRAIN_CACHE",),
    "ranks_per_node": ("MPITRAIN_RANKS_PER_NODE",),
    "require_mpi": ("MPITRAIN_REQUIRE_MPI",),
    "mpiexec": ("MPITRAIN_MPIEXEC",),
    "require_slurm": ("MPITRAIN_REQUIRE_SLURM",),
    "require_cluster": ("MPITRAIN_REQUIRE_CLUSTER",),
    "require_ulfm": ("MPITRAIN_REQUIRE_ULFM",),
    # the emulated cluster's mpiexec wrapper: ranks per node (read by the wrapper script, and
    # propagated to every rank by hydra's -genvall: it must not count as a training option)
    "cluster_per_node": ("MPITRAIN_CLUSTER_PER_NODE",),
    # the emulated cluster (docs/cluster.md) sets OMP_NUM_THREADS=1 on its ranks when unset
    "omp_num_threads": ("OMP_NUM_THREADS",),
    # variables of the sbatch templates (slurm/README.md); not training options
    "slurm_launcher": ("MPITRAIN_LAUNCHER",),
    "slurm_srun_mpi": ("MPITRAIN_SRUN_MPI",),
    "slurm_requeue": ("MPITRAIN_REQUEUE",),
    "slurm_max_restarts": ("MPITRAIN_MAX_RESTARTS",),
    "slurm_python": ("MPITRAIN_PYTHON",),
    "slurm_mpirun": ("MPITRAIN_MPIRUN",),
    "slurm_continuation": ("MPITRAIN_CONTINUATION",),
    "slurm_sweep_dir": ("MPITRAIN_SWEEP_DIR",),
    "xdg_cache_home": ("XDG_CACHE_HOME",),
    "home": ("HOME",),
    # the exchange modes' options are TrainConfig fields (MPITRAIN_DELAY_COMPENSATION etc.)
}

#: prefix of configuration variables (``MPITRAIN_EPOCHS`` -> option ``epochs``)
CONFIG_PREFIX = "MPITRAIN_"
#: our variables that are not training options (excluded from config resolution)
NON_CONFIG = frozenset(
    name for key, names in TABLE.items() for name in names if name.startswith(CONFIG_PREFIX)
)


def get(
    key: str, default: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """Return the first set variable for a table key, else ``default``."""
    src = os.environ if environ is None else environ
    for name in TABLE[key]:
        value = src.get(name)
        if value is not None and value != "":
            return value
    return default


def get_int(
    key: str, environ: Mapping[str, str] | None = None, *, minimum: int = 0
) -> int | None:
    """Return a table key as an int (``>= minimum``), or None when unset.

    Only plain ASCII digits count: ``int()`` would also take ``' 4'``, ``'+4'``, ``'1_0'``
    and non-ASCII digits.

    Raises:
        ConfigError: the variable is not a plain decimal integer in range (names it).
    """
    from mpitrain.errors import ConfigError, with_hint

    value = get(key, environ=environ)
    if value is None:
        return None
    text = value
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) < minimum:
        src = os.environ if environ is None else environ
        name = next((n for n in TABLE[key] if src.get(n)), TABLE[key][0])
        raise ConfigError(
            with_hint(
                f"environment variable {name}={value!r} is not an integer >= {minimum}",
                f"set {name} to a whole number or unset it",
            )
        )
    return int(text)


def config_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``MPITRAIN_*`` option variables as ``{option_name: value}``."""
    src = os.environ if environ is None else environ
    return {
        name[len(CONFIG_PREFIX) :].lower(): value
        for name, value in src.items()
        if name.startswith(CONFIG_PREFIX) and name not in NON_CONFIG
    }


def snapshot(prefixes: tuple[str, ...] = ("SLURM_",)) -> dict[str, str]:
    """Return all variables with the given prefixes (for `doctor` reports)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}
