"""Fixtures for the emulated-cluster tests (docs/cluster.md): root, `ip netns`, MPICH hydra.

Skips where this machine cannot host the namespaces; with MPITRAIN_REQUIRE_CLUSTER=1 (CI) a
missing capability fails instead. Every fixture that brings a cluster up takes it down in its
finalizer (`cluster down --kill`), also when the test failed. One pytest session at a time
uses the cluster (a lock file), since the names are machine-wide.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpitrain.cluster.launch import find_mpiexec
from mpitrain.cluster.state import STATE_DIR, state_path
from mpitrain.runtime import env
from mpitrain.runtime.launch import launch_env

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
PY = sys.executable
SESSION_LOCK = Path("/run/mpitrain-cluster-tests.lock")


def unavailable(reason: str) -> None:
    """Skip, or fail when MPITRAIN_REQUIRE_CLUSTER=1."""
    if env.get("require_cluster") == "1":
        pytest.fail(f"{reason} but MPITRAIN_REQUIRE_CLUSTER=1")
    pytest.skip(f"{reason} (set MPITRAIN_REQUIRE_CLUSTER=1 to make this a failure)")


def _probe() -> str | None:
    """Why this machine cannot host the cluster, or None when it can.

    The probe builds a veth pair with a tbf qdisc inside a private, unnamed namespace
    (``unshare --net``), so it touches no name on the machine.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return "the cluster tests need root (network namespaces)"
    missing = [t for t in ("ip", "tc", "unshare", "hostname") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    script = (
        "ip link add pa type veth peer name pb && ip link add pbr type bridge && "
        "tc qdisc add dev pa root tbf rate 1gbit burst 64k latency 50ms && hostname probe"
    )
    for argv in (["ip", "netns", "list"], ["unshare", "--net", "--uts", "sh", "-c", script]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(argv)}` failed: {exc}"
        if proc.returncode != 0:
            return f"`{' '.join(argv[:3])}` failed: {proc.stderr.strip()[-300:]}"
    exe = find_mpiexec()
    if exe is None:
        return "mpiexec not found"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "HYDRA" not in out:
        return f"{exe} is not MPICH's hydra (the cluster launcher needs it)"
    return None


@pytest.fixture(scope="session")
def cluster_ok() -> Iterator[None]:
    """The machine can host the cluster and no other cluster is up; holds the session lock."""
    reason = _probe()
    if reason is not None:
        unavailable(reason)
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + 240
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                unavailable("another pytest session held the cluster for 240 s")
            time.sleep(1)
    try:
        if state_path(STATE_DIR).exists():
            unavailable(
                f"a cluster is already up ({state_path(STATE_DIR)}); the tests do not touch "
                "it: run `python -m mpitrain cluster down` first"
            )
        yield
    finally:
        os.close(fd)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60,
    check: bool = True,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from the repo root in its own process group; past ``timeout`` kill it all."""
    child_env = launch_env(extra_env)
    proc = subprocess.Popen(
        list(argv), cwd=ROOT, env=child_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout}s (hang): {' '.join(argv)}\n{out[-3000:]}\n{err[-3000:]}"
        )
    done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and done.returncode != 0:
        pytest.fail(
            f"exit {done.returncode}: {' '.join(argv)}\n--- stdout\n{out[-4000:]}"
            f"\n--- stderr\n{err[-4000:]}"
        )
    return done


def cli(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m mpitrain cluster ARGS``."""
    return run([PY, "-m", "mpitrain", "cluster", *args], timeout=timeout, check=check)


def status() -> dict[str, Any]:
    """``cluster status --json``."""
    return json.loads(cli("status", "--json").stdout)  # type: ignore[no-any-return]


def sent(info: dict[str, Any]) -> dict[str, int]:
    """Bytes each node has sent into its link."""
    return {r["name"]: int(r["sent_bytes"]) for r in info["nodes"]}


@dataclass
class Cluster:
    """A running cluster of ``nodes`` nodes; ``mpiexec`` runs a job on it."""

    nodes: int
    cache: Path

    def mpiexec(
        self,
        n: int,
        args: Sequence[str],
        *,
        per_node: int | None = None,
        timeout: float = 120,
        check: bool = True,
        extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` (a scenario name, or ``-m module ...``) as ``n`` ranks."""
        argv = list(args)
        if argv and argv[0].endswith(".py") and not Path(argv[0]).is_absolute():
            argv[0] = str(SCENARIOS / argv[0])
        placement = ["--per-node", str(per_node)] if per_node else []
        cmd = [PY, "-m", "mpitrain", "cluster", "mpiexec", "-n", str(n), *placement, *extra,
               "--", PY, *argv]  # fmt: skip
        cache = {"MPITRAIN_CACHE": str(self.cache)}
        return run(cmd, timeout=timeout, check=check, extra_env=cache)


def down() -> None:
    """Take the cluster down, ending whatever still runs on it (finalizers)."""
    proc = subprocess.run(
        [PY, "-m", "mpitrain", "cluster", "down", "--kill"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def cluster2(cluster_ok: None, digits_cache: Path) -> Iterator[Cluster]:
    """Two nodes at an unlimited link rate for this module; down afterwards, even on failure."""
    try:
        cli("up", "--nodes", "2", "--link", "none")
        yield Cluster(2, digits_cache)
    finally:
        down()


@pytest.fixture(scope="module")
def cluster4(cluster_ok: None, digits_cache: Path) -> Iterator[Cluster]:
    """Four nodes at 1 Gbit/s for this module; down afterwards, even on failure.

    Fixtures built on it (the Slurm daemons of tests/cluster/slurm_nodes.py) are torn down
    first: pytest finalizes dependants before what they depend on.
    """
    try:
        cli("up", "--nodes", "4", "--link", "1gbit")
        yield Cluster(4, digits_cache)
    finally:
        down()
