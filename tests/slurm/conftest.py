"""Session fixture: a real one-node Slurm cluster (tests/slurm/cluster.sh) for the `slurm` tests.

Skips where it cannot run (not root, no apt-get, install failed); with MPITRAIN_REQUIRE_SLURM=1
(CI) those become failures. Stops only what this session started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpitrain.runtime import env
from tests.slurm import slurmctl

STATE_DIR = Path("/tmp/mpitrain-slurm")


def unavailable(reason: str) -> None:
    """Skip, or fail when MPITRAIN_REQUIRE_SLURM=1."""
    if env.get("require_slurm") == "1":
        pytest.fail(f"{reason} but MPITRAIN_REQUIRE_SLURM=1")
    pytest.skip(f"{reason} (set MPITRAIN_REQUIRE_SLURM=1 to make this a failure)")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start the local cluster (idempotent); yield a scratch dir; stop it if we started it."""
    if os.name != "posix" or os.geteuid() != 0:
        unavailable("the Slurm tests need root (slurmd runs as SlurmUser=root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        unavailable("Slurm is not installed and there is no apt-get to install it")
    was_running = (
        shutil.which("sinfo") is not None
        and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    )
    proc = subprocess.run(
        [str(slurmctl.CLUSTER_SH), "start", str(STATE_DIR)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode == slurmctl.CANNOT_RUN:
        unavailable(f"cannot start Slurm here: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    yield tmp_path_factory.mktemp("slurm")
    if not was_running:
        subprocess.run([str(slurmctl.CLUSTER_SH), "stop", str(STATE_DIR)], capture_output=True)


#: alias under the name session A asked for
slurm_cluster = cluster
