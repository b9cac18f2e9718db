"""MPI jobs across emulated nodes: placement, traffic over the links, World, training, abort."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mpitrain.runtime.launch import launch_env, mpiexec_command
from tests.cluster.conftest import PY, ROOT, SCENARIOS, Cluster, cli, run, sent, status

pytestmark = pytest.mark.mpi

MIB = 8
#: gradient bytes of the digits MLP (64-128-128-10, float32) per step
DIGITS_GRAD_BYTES = 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)


def result(proc: subprocess.CompletedProcess[str]) -> Any:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def loopback(info: dict[str, Any]) -> dict[str, int]:
    return {r["name"]: int(r["loopback_bytes"]) for r in info["nodes"]}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("netmod", ["ucx", "ofi"])
def test_two_nodes_one_rank_each_traffic_crosses_links(cluster2: Cluster, netmod: str) -> None:
    before = status()
    ranks = result(cluster2.mpiexec(2, ["topology.py", str(MIB)], extra=["--netmod", netmod]))
    after = status()
    assert [(r["rank"], r["host"], r["shared_size"]) for r in ranks] == [
        (0, "mpt-node1", 1), (1, "mpt-node2", 1),
    ]  # fmt: skip
    size = ranks[0]["allreduce_bytes"]
    assert size == MIB << 20
    moved = delta(sent(after), sent(before))
    # a 2-rank all-reduce of S bytes sends at least S from each rank, here over its link
    assert all(size <= b < 3 * size for b in moved.values()), moved


def test_default_mpich_transport_would_bypass_the_links(cluster2: Cluster) -> None:
    """Why the netmod variables exist: MPICH's own choice moves the data in shared memory."""
    before = sent(status())
    result(cluster2.mpiexec(2, ["topology.py", str(MIB)], extra=["--netmod", "shm"]))
    moved = delta(sent(status()), before)
    assert all(b < (MIB << 20) // 8 for b in moved.values()), moved


def test_two_nodes_two_ranks_world_and_hierarchical(cluster2: Cluster) -> None:
    before = status()
    ranks = result(cluster2.mpiexec(4, ["topology.py", str(MIB), "--reducers"], per_node=2))
    after = status()
    got = [(r["rank"], r["host"], r["shared_size"], r["local_rank"], r["node_index"])
           for r in ranks]  # fmt: skip
    assert got == [
        (0, "mpt-node1", 2, 0, 0), (1, "mpt-node1", 2, 1, 0),
        (2, "mpt-node2", 2, 0, 1), (3, "mpt-node2", 2, 1, 1),
    ]  # fmt: skip
    assert all(r["num_nodes"] == 2 and r["local_size"] == 2 for r in ranks)
    assert all(r[f"{v}_ints_bitwise"] for r in ranks for v in ("reduce_bcast", "rs_ag"))
    moved = delta(sent(after), sent(before))
    assert all(b >= MIB << 20 for b in moved.values()), moved
    # ranks on one node keep MPICH's shared memory: nothing sizeable over TCP loopback
    local = delta(loopback(after), loopback(before))
    assert all(b < 1 << 20 for b in local.values()), local


def test_exit_code_and_environment_pass_through(cluster2: Cluster) -> None:
    names = ["PATH", "VIRTUAL_ENV", "PYTHONPATH", "OMP_NUM_THREADS", "MPITRAIN_PROBE"]
    code = (
        "import json, os, sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        f"e = json.dumps({{k: os.environ.get(k) for k in {names!r}}}); "
        "sys.stdout.write(f'ENV {c.rank} {e}\\n'); sys.stdout.flush(); "
        "sys.exit(3 if c.rank == 1 else 0)"
    )
    probe = {"MPITRAIN_PROBE": "yes", "VIRTUAL_ENV": "/probe/venv", "PYTHONPATH": str(ROOT),
             "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [PY, "-m", "mpitrain", "cluster", "mpiexec", "-n", "2", "--", PY, "-c", code]
    proc = run(cmd, check=False, extra_env=probe)
    assert proc.returncode == 3, proc.stderr
    seen = re.findall(r"ENV (\d) (\{[^}]*\})", proc.stdout)
    assert sorted(int(r) for r, _ in seen) == [0, 1], proc.stdout
    want = {**probe, "PATH": launch_env()["PATH"]}
    assert all(json.loads(js) == want for _, js in seen), proc.stdout


def test_link_rate_limits_the_allreduce(cluster2: Cluster) -> None:
    cli("up", "--nodes", "2", "--link", "1gbit")
    try:
        r = result(cluster2.mpiexec(2, ["allreduce_time.py", "16", "3"]))
    finally:
        cli("up", "--nodes", "2", "--link", "none")
    # 16 MiB each way through 1 Gbit/s takes >= 134 ms; tbf may not let more through
    assert 0.4 < r["busbw_gbit"] <= 1.05, r


def test_digits_two_nodes_match_four_ranks_on_one_host(cluster2: Cluster, tmp_path: Path) -> None:
    args = ["-m", "mpitrain", "--epochs", "2", "--no-progress", "--summary-json"]
    before = sent(status())
    auto = [*args, str(tmp_path / "cluster.json"), "--allreduce", "auto"]
    proc = cluster2.mpiexec(4, auto, per_node=2, timeout=180)
    moved = delta(sent(status()), before)
    # on real node boundaries `auto` picks the hierarchical all-reduce
    assert "gradient transport: Hierarchical" in proc.stdout + proc.stderr
    local = [*mpiexec_command(4), PY, *args, str(tmp_path / "host.json")]
    run(local, timeout=180, extra_env={"MPITRAIN_CACHE": str(cluster2.cache)})
    a = json.loads((tmp_path / "cluster.json").read_text())
    b = json.loads((tmp_path / "host.json").read_text())
    print(f"digits: cluster {a['final_loss']!r} {a['test_accuracy']!r}, host "
          f"{b['final_loss']!r} {b['test_accuracy']!r}; sent per node {moved}")
    assert a["world_size"] == b["world_size"] == 4 and a["steps"] == b["steps"]
    # same data order. Measured: identical to the last bit (leaders' (a+b)+(c+d) is the
    # order of MPICH's flat recursive doubling too); the tolerance allows another order
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4, abs=1e-5)
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.006)
    assert all(v >= a["steps"] * DIGITS_GRAD_BYTES for v in moved.values()), moved


def test_losing_a_node_ends_the_job_within_30s(cluster2: Cluster) -> None:
    cmd = [PY, "-m", "mpitrain", "cluster", "mpiexec", "-n", "4", "--per-node", "2", "--",
           PY, str(SCENARIOS / "node_loss.py")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for ln in proc.stdout or []:
            lines.put(ln)

    reader = threading.Thread(target=pump)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not running(seen):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        victims = [int(pid) for _, host, pid in ready(seen) if host == "mpt-node2"]
        assert len(victims) == 2, seen
        t0 = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
    out = "".join(seen) + "".join(iter_queue(lines))
    print(f"node loss: the job ended {elapsed:.2f} s after the kill, exit {code}")
    assert code != 0 and elapsed < 30, (code, elapsed)
    assert "BAD TERMINATION" in out and "RUNNING AT mpt-node2" in out, out[-3000:]
    assert not any(r.get("sent_bytes") is None for r in status()["nodes"])


def ready(lines: list[str]) -> list[tuple[str, str, str]]:
    """(rank, host, pid) of every READY report so far."""
    return re.findall(r"READY rank (\d+) host (\S+) pid (\d+)", "".join(lines))


def running(lines: list[str]) -> bool:
    """Every rank said READY and the loop has started."""
    return len(ready(lines)) == 4 and any("step " in ln for ln in lines)


def iter_queue(q: queue.Queue[str]) -> list[str]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_mpiexec_wrapper_runs_any_launcher_user_across_the_nodes(cluster2: Cluster) -> None:
    """MPITRAIN_MPIEXEC=<wrapper>: mpiexec_command() jobs (benchmarks, fixtures) span nodes."""
    wrapper = status()["mpiexec"]
    assert os.access(wrapper, os.X_OK), wrapper
    before = sent(status())
    cmd = [*mpiexec_command(2, wrapper), PY, str(SCENARIOS / "topology.py"), str(MIB)]
    env = launch_env({"MPITRAIN_MPIEXEC": wrapper})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = result(proc)
    assert sorted(r["host"] for r in ranks) == ["mpt-node1", "mpt-node2"], ranks
    moved = delta(sent(status()), before)
    assert all(b >= MIB << 20 for b in moved.values()), moved
    usage = subprocess.run([wrapper, "python"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
