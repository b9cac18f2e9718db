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

import collections
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
from mpitrain.train.sample_log import read_sample_log
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


#: the digits training split (1437 samples) in global batches of 48, the tail dropped
ELASTIC_STEPS_PER_EPOCH = 1437 // 48


def last_logged(prefix: Path) -> tuple[int, int] | None:
    """(step, world size) of the last micro-batch rank 0 logged, None before the first."""
    path = prefix.parent / f"{prefix.name}.rank0"
    text = path.read_text() if path.exists() else ""
    lines = text[: text.rfind("\n") + 1].splitlines()  # not a line still being written
    if not lines:
        return None
    _, step, world, *_ = lines[-1].split()
    return int(step), int(world)


def wait_node_states(slurm: Slurm, want: dict[str, str], timeout: float = 60) -> None:
    """Wait until sinfo reports every node of ``want`` in that state (``idle``, ``drained``)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = slurm_nodes.node_states(slurm.nodes)
        if all(states.get(n) == st for n, st in want.items()):
            return
        time.sleep(0.2)
    pytest.fail(f"nodes not {want} after {timeout}s: {states}\n{slurm.nodes.log_tails()}")


def set_nodes(slurm: Slurm, nodes: str, *state: str, check: bool = True) -> None:
    """``scontrol update NodeName=NODES STATE...`` on the head."""
    argv = slurm.nodes.client("scontrol", "update", f"NodeName={nodes}", *state)
    slurmctl.run(*argv, check=check)


def preempt_when(slurm: Slurm, job: str, work: Path, world: int, step: int) -> dict[str, str]:
    """Once ``world`` ranks have logged ``step``: USR1, wait for the requeue; the job record
    as it ran (NumNodes, NodeList)."""
    deadline = time.monotonic() + 120
    while (at := last_logged(work / "samples")) is None or at[1] != world or at[0] < step:
        assert time.monotonic() < deadline, f"no step {step} on {world} ranks{slurm.why(work)}"
        st = slurmctl.states(job)
        assert not set(st) & slurmctl.FINAL, slurm.why(work, slurmctl.job_info(job))
        time.sleep(0.1)
    running = slurmctl.job_info(job)
    restarts = int(running.get("Restarts", "0"))
    slurmctl.run("scancel", "--signal=USR1", "--batch", job)
    info = slurmctl.wait_for(job, 90, want={"PENDING", *slurmctl.FINAL})
    requeued = info["JobState"] == "PENDING" and info.get("Restarts") == str(restarts + 1)
    assert requeued, slurm.why(work, info)
    return running


@pytest.mark.timeout(240)
def test_elastic_4_then_2_then_3_nodes_covers_the_epoch_once(slurm4: Slurm) -> None:
    """--nodes 2-4, --global-batch 48: preempted on 4 nodes, resumed on 2 (nodes 3-4 drained),
    preempted again, resumed on 3, all inside the first epoch: every step trains 48 samples,
    every sample of each epoch exactly once, with the same lr on every node count."""
    work = slurm4.workdir("elastic")
    samples = work / "samples"
    # 100 ms per step (the straggler): a preemption lands a few steps after the signal,
    # well inside the 29-step epoch
    train = ["--global-batch", "48", "--epochs", "2", "--no-progress", "--straggler-ms", "100",
             "--sample-log", str(samples),
             "--summary-json", str(work / "summary.json")]  # fmt: skip
    script = render(work / "job.sbatch", "train-cpu", "--nodes", "4", "--min-nodes", "2",
                    "--ntasks-per-node", "1", "--job-name", "elastic",
                    "--checkpoint-dir", str(work / "ckpt"), train=train)  # fmt: skip
    assert "#SBATCH --nodes=2-4" in script.read_text()
    names = slurm4.nodes.names
    wait_node_states(slurm4, dict.fromkeys(names, "idle"))  # else it starts on fewer
    job = slurm4.sbatch(script, work)
    ran: list[dict[str, str]] = []
    try:
        info = slurmctl.wait_for(job, 60, want={"RUNNING", *slurmctl.FINAL})
        assert info["NumNodes"] == "4", (  # as many nodes of the range as are idle
            f"--nodes=2-4 started on {info['NumNodes']} of 4 idle nodes "
            f"(NumTasks={info.get('NumTasks')}){slurm4.why(work, info)}"
        )
        ran.append(preempt_when(slurm4, job, work, 4, 3))
        set_nodes(slurm4, "mpt-node3,mpt-node4", "State=DRAIN", "Reason=elastic-test")
        wait_node_states(slurm4, {**dict.fromkeys(names[:2], "idle"),
                                  **dict.fromkeys(names[2:], "drained")})  # fmt: skip
        slurmctl.release_requeued(job)
        first_on_2 = max(s for _, s, w, _ in read_sample_log(samples) if w == 4) + 1
        ran.append(preempt_when(slurm4, job, work, 2, first_on_2 + 2))
        set_nodes(slurm4, "mpt-node3", "State=RESUME")
        wait_node_states(slurm4, {**dict.fromkeys(names[:3], "idle"), names[3]: "drained"})
        slurmctl.release_requeued(job)
        ran.append(finish(slurm4, job, work, 150))
    finally:
        if not set(slurmctl.states(job)) <= slurmctl.FINAL:
            slurmctl.run("scancel", job, check=False)
        set_nodes(slurm4, "mpt-node3,mpt-node4", "State=RESUME", check=False)
    log = log_of(work)
    got = [(r["NumNodes"], slurm4.hostnames(r["NodeList"])) for r in ran]
    assert got == [("4", names), ("2", names[:2]), ("3", names[:3])], got
    for n in (4, 2, 3):
        assert f"{n} ranks on {n} node(s)" in log, slurm4.why(work)
    lines = re.findall(r"global batch 48 = (\d+) ranks x (\d+) samples x 1 accumulated "
                       r"\(lr ([0-9.e+-]+)\)", log)  # fmt: skip
    assert [(int(n), int(b)) for n, b, _ in lines] == [(4, 12), (2, 24), (3, 16)], lines
    assert len({lr for *_, lr in lines}) == 1, lines  # lr x 48 / --batch-size on every count
    summary = json.loads((work / "summary.json").read_text())
    assert summary["world_size"] == 3, summary
    rows = read_sample_log(samples)
    per_step: dict[int, int] = collections.Counter()
    worlds: dict[int, set[int]] = collections.defaultdict(set)
    seen: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for epoch, step, world, idx in rows:
        per_step[step] += len(idx)
        worlds[world].add(step)
        seen[epoch].update(idx)
    spans = {w: (min(s), max(s), len(s)) for w, s in worlds.items()}
    print(f"elastic: (first, last, count) of steps per world size {spans}")
    assert set(per_step.values()) == {48}, {s: n for s, n in per_step.items() if n != 48}
    assert sorted(per_step) == list(range(2 * ELASTIC_STEPS_PER_EPOCH)), sorted(per_step)
    assert max(worlds[4]) < min(worlds[2]) and max(worlds[2]) < min(worlds[3]), spans
    assert max(worlds[2]) < ELASTIC_STEPS_PER_EPOCH, f"epoch 0 not on 4, 2 and 3 nodes: {spans}"
    for epoch in (0, 1):
        twice = sorted(i for i, c in seen[epoch].items() if c > 1)
        assert not twice, f"epoch {epoch}: {len(twice)} samples trained twice: {twice[:10]}"
        assert len(seen[epoch]) == ELASTIC_STEPS_PER_EPOCH * 48, (epoch, len(seen[epoch]))
