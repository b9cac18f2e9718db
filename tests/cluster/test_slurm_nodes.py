"""The sbatch templates on a real Slurm cluster spanning the emulated nodes.

slurmctld runs on the head (``mpt-head``, 10.213.0.254), one slurmd per node
(``mpt-nodeI`` at 10.213.0.I), started by tests/cluster/slurm_nodes.py on a 4-node, 1 Gbit/s
emulated cluster; the Slurm clients run on the head (the harness's ``bin`` wrappers, put first
on PATH so tests/slurm/slurmctl.py's helpers drive this cluster). Jobs force MPICH onto TCP
over ``mpt0`` (the cluster launcher's ofi variables), so their traffic crosses the links and
shows in the link counters. Run (as root):
  OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/cluster/test_slurm_nodes.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from mpitrain.cluster.launch import NETMODS
from mpitrain.runtime import env
from tests.cluster import slurm_nodes
from tests.cluster.conftest import PY, ROOT, SCENARIOS, Cluster, run, sent, status
from tests.slurm import slurmctl

pytestmark = [pytest.mark.mpi, pytest.mark.slurm]

#: gradient bytes of the digits MLP (64-128-128-10, float32) per step
DIGITS_GRAD_BYTES = 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when MPITRAIN_REQUIRE_SLURM=1 (as tests/slurm/conftest.py does)."""
    if env.get("require_slurm") == "1":
        pytest.fail(f"{reason} but MPITRAIN_REQUIRE_SLURM=1")
    pytest.skip(f"{reason} (set MPITRAIN_REQUIRE_SLURM=1 to make this a failure)")


@dataclass
class Slurm:
    """The running Slurm-on-the-nodes cluster and a scratch directory for jobs."""

    nodes: slurm_nodes.SlurmNodes
    scratch: Path

    def workdir(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir()
        return path

    def job_env(self, work: Path) -> dict[str, str]:
        """Job environment: this venv first, our slurm.conf, MPICH's TCP netmod over mpt0."""
        bindir = str(Path(PY).parent)
        out = {k: v for k, v in os.environ.items() if not k.startswith(("MPITRAIN_", "SLURM_"))}
        out.update(
            PATH=f"{bindir}:/usr/bin:/bin:/usr/sbin:/sbin",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            SLURM_CONF=str(self.nodes.conf),  # scontrol requeue / srun inside the job
            MPITRAIN_CACHE=str(work / "cache"),  # one per job: concurrent builds race
            **NETMODS["ofi"],  # as `cluster mpiexec` sets: TCP over mpt0, not shared memory
        )
        return out

    def sbatch(self, script: Path, work: Path) -> str:
        """Submit ``script`` from the head with ``work`` as its directory; return the job id."""
        argv = self.nodes.client("sbatch", "--parsable", f"--chdir={work}", str(script))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env=self.job_env(work), cwd=work)  # fmt: skip
        assert proc.returncode == 0, f"sbatch -> {proc.returncode}: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def why(self, work: Path, info: dict[str, str] | None = None) -> str:
        """Failure context: the job record, its log and the daemons' log tails."""
        return f"{info or ''}\n--- job log\n{log_of(work)[-4000:]}\n{self.nodes.log_tails()}"

    def hostnames(self, nodelist: str) -> list[str]:
        """Expand a Slurm node list (``mpt-node[1-2]``)."""
        return slurmctl.run(*self.nodes.client("scontrol", "show", "hostnames", nodelist)).split()


@pytest.fixture(scope="module")
def slurm4(cluster4: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """Slurm on the 4 nodes; the clients on PATH for slurmctl; stopped first in teardown."""
    try:
        try:
            cl = slurm_nodes.start()
        except slurm_nodes.CannotRun as exc:
            unavailable(f"cannot run Slurm here: {exc}")
        except slurm_nodes.HarnessError as exc:
            pytest.fail(f"slurm_nodes start failed: {exc}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PATH", f"{cl.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
            yield Slurm(cl, tmp_path_factory.mktemp("slurm-nodes"))
    finally:
        slurm_nodes.stop()


def render(out: Path, template: str, *opts: str, train: list[str]) -> Path:
    """Render a template with the real CLI into ``out``."""
    cmd = [PY, "-m", "mpitrain", "slurm", "render", template, "--python", PY, "--time", "10",
           "--output", str(out), *opts, "--", *train]  # fmt: skip
    run(cmd, timeout=60)
    return out


def log_of(work: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(work.glob("*.out")))


def result(path: Path) -> Any:
    """The ``RESULT <json>`` line a scenario printed into ``path``."""
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def finish(slurm: Slurm, job: str, work: Path, timeout: float = 150) -> dict[str, str]:
    """Wait for ``job``; fail with its log and the daemons' logs unless it COMPLETED."""
    try:
        info = slurmctl.wait_for(job, timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}{slurm.why(work)}")
    assert info["JobState"] == "COMPLETED", slurm.why(work, info)
    return info


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [2, 4])
def test_train_cpu_across_nodes_with_srun(slurm4: Slurm, n: int) -> None:
    """train-cpu --nodes N (1 task each, srun --mpi=pmi2): one rank per node, over the links."""
    work = slurm4.workdir(f"train-{n}")
    # a first job step in the same allocation: every rank's hostname and node-local group
    hosts = (f'srun --mpi="$MPITRAIN_SRUN_MPI" {PY} {SCENARIOS / "topology.py"} 1 '
             f"> {work / 'topology.txt'}")  # fmt: skip
    script = render(work / "job.sbatch", "train-cpu", "--nodes", str(n), "--ntasks-per-node",
                    "1", "--job-name", f"nodes-{n}", "--env-setup", hosts,
                    train=["--epochs", "1", "--no-progress",
                           "--summary-json", str(work / "summary.json")])  # fmt: skip
    assert "MPITRAIN_LAUNCHER=${MPITRAIN_LAUNCHER:-srun}" in script.read_text()  # the default
    before = sent(status())
    job = slurm4.sbatch(script, work)
    info = finish(slurm4, job, work)
    moved = {k: v - before[k] for k, v in sent(status()).items()}
    nodes = slurm4.hostnames(info["NodeList"])
    assert len(nodes) == n, info
    ranks = result(work / "topology.txt")
    got = [(r["rank"], r["host"], r["shared_size"]) for r in ranks]
    assert got == [(i, nodes[i], 1) for i in range(n)], got  # a node per rank, each its own
    summary = json.loads((work / "summary.json").read_text())
    assert summary["world_size"] == n, summary
    log = log_of(work)
    assert f"{n} ranks on {n} node(s)" in log and f"restart 0 on {info['NodeList']}" in log, log
    assert re.search(r"srun --mpi=pmi2 ", log), log
    # every step all-reduces the gradients: >= S (N-1)/N bytes out of each rank's node
    least = summary["steps"] * DIGITS_GRAD_BYTES * (n - 1) // n
    print(f"train-cpu on {n} nodes: {summary['steps']} steps, sent per node {moved}, least {least}")
    assert all(moved[h] >= least for h in nodes), (least, moved)
    idle = [h for h in moved if h not in nodes]
    assert all(moved[h] < least // 4 for h in idle), (least, moved)  # Slurm's own chatter


def _final_model(ckpt_dir: Path) -> dict[str, Any]:
    import torch

    latest = sorted(ckpt_dir.glob("step-*.pt"))[-1]
    state = torch.load(latest, map_location="cpu", weights_only=False)
    return dict(state["model"])


@pytest.mark.timeout(240)
def test_preemption_requeue_resume_bitwise_on_two_nodes(slurm4: Slurm) -> None:
    """USR1 mid-run on 2 nodes -> checkpoint, exit 99, requeue, resume: bitwise-equal result."""
    import torch

    train = ["--epochs", "3", "--no-progress", "--straggler-ms", "60"]
    jobs = {}
    for name in ("preempted", "reference"):
        work = slurm4.workdir(name)
        script = render(work / "job.sbatch", "train-cpu", "--nodes", "2", "--ntasks-per-node",
                        "1", "--job-name", name, "--checkpoint-dir", str(work / "ckpt"),
                        train=[*train, "--summary-json", str(work / "summary.json")])  # fmt: skip
        jobs[name] = (work, slurm4.sbatch(script, work))
    work, job = jobs["preempted"]
    deadline = time.monotonic() + 120
    while "epoch   1/3" not in log_of(work):  # mid-run: after the first epoch
        assert time.monotonic() < deadline, f"no epoch 1 in time{slurm4.why(work)}"
        assert "exited with status" not in log_of(work), slurm4.why(work)
        time.sleep(0.2)
    first_nodes = slurmctl.job_info(job)["NodeList"]
    slurmctl.run("scancel", "--signal=USR1", "--batch", job)
    info = slurmctl.wait_for(job, 90, want={"PENDING", *slurmctl.FINAL})
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", slurm4.why(work, info)
    assert list((work / "ckpt").glob("step-*.pt")), f"no checkpoint{slurm4.why(work)}"
    slurmctl.release_requeued(job)  # what the ~120 s requeue delay guarantees on a real cluster
    info = finish(slurm4, job, work, 150)
    log = log_of(work)
    # 99 itself, or srun's 143 when --kill-on-bad-exit ended a rank still exiting (_run.sh)
    preempted = re.search(r"exited with status 99|treating it as preempted \(99\)", log)
    assert "restart 1" in log and preempted, slurm4.why(work, info)
    assert len(slurm4.hostnames(first_nodes)) == len(slurm4.hostnames(info["NodeList"])) == 2
    ref_work, ref_job = jobs["reference"]
    finish(slurm4, ref_job, ref_work, 120)
    summaries = [json.loads((w / "summary.json").read_text()) for w in (work, ref_work)]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"], summaries
    assert summaries[0]["steps"] == summaries[1]["steps"], summaries
    got, want = _final_model(work / "ckpt"), _final_model(ref_work / "ckpt")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.timeout(150)
def test_sweep_array_tasks_spread_over_nodes(slurm4: Slurm) -> None:
    """The sweep template's array tasks run on different nodes (SLURMD_NODENAME = hostname)."""
    work = slurm4.workdir("sweep")
    grid = work / "grid.csv"
    grid.write_text("lr,seed\n0.05,0\n0.1,1\n0.02,2\n")
    where = f'echo "$SLURM_ARRAY_TASK_ID $SLURMD_NODENAME $(hostname)" >> {work / "where.txt"}'
    script = render(work / "job.sbatch", "sweep", "--ntasks-per-node", "1", "--grid", str(grid),
                    "--sweep-dir", str(work / "runs"), "--job-name", "sweep",
                    "--env-setup", where, train=["--epochs", "1", "--no-progress"])  # fmt: skip
    job = slurm4.sbatch(script, work)
    try:
        slurmctl.wait_for(job, 140)
    except TimeoutError as exc:
        pytest.fail(f"{exc}{slurm4.why(work)}")
    assert set(slurmctl.states(job)) == {"COMPLETED"}, slurm4.why(work)
    rows = sorted(tuple(line.split()) for line in (work / "where.txt").read_text().splitlines())
    assert [r[0] for r in rows] == ["0", "1", "2"], rows
    assert all(node == host for _, node, host in rows), rows  # the task ran on its node
    assert len({node for _, node, _ in rows}) > 1, f"all array tasks on one node: {rows}"
    for i in range(3):
        summary = json.loads((work / "runs" / f"task-{i}" / "summary.json").read_text())
        assert summary["world_size"] == 1, summary
