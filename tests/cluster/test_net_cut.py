"""A node cut off from the network, or frozen, during a run: the job still ends (issue 26 item 4).

The scenario (scenarios/net_cut.py) loops all-reduces under the hang watchdog on 2 nodes x 2
ranks. The test sets node 2's link down, or stops every process of node 2 (SIGSTOP), and
measures the time from then to the end of `mpiexec` and to the last process of the job.
Each rank's stderr goes to a file of its own (the namespaces share the file system), so the
last words of the ranks on a cut-off node, which cannot reach `mpiexec`, are read too.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mpitrain.cluster.netns import netns_pids
from mpitrain.runtime.abort import EXIT_AFTER_ABORT_S
from mpitrain.runtime.launch import launch_env
from tests.cluster.conftest import PY, ROOT, SCENARIOS, Cluster

pytestmark = pytest.mark.mpi

#: --hang-timeout of the scenario, and the watchdog's grace for it (min(5, max(1, t / 2)))
HANG_TIMEOUT = 3.0
GRACE = 1.5
#: a non-zero rank that hears nothing from rank 0 aborts by itself after grace + this
SILENT_RANK0_S = 5.0
#: room for a loaded 2-core machine
MARGIN = 10.0
NAMESPACES = ("mpt-head", "mpt-node1", "mpt-node2")
RANKS, PER_NODE = 4, 2
CUT_RANKS = (2, 3)  # the ranks on mpt-node2


class Job:
    """`cluster mpiexec` of the scenario, its stdout read by a thread, each rank's stderr a file."""

    def __init__(self, errdir: Path) -> None:
        self.errdir = errdir
        rank_cmd = (
            f"exec {shlex.quote(PY)} {shlex.quote(str(SCENARIOS / 'net_cut.py'))} "
            f"{HANG_TIMEOUT:g} 2>{shlex.quote(str(errdir))}/rank$PMI_RANK.err"
        )
        cmd = [PY, "-m", "mpitrain", "cluster", "mpiexec", "-n", str(RANKS),
               "--per-node", str(PER_NODE), "--", "sh", "-c", rank_cmd]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=launch_env({"PYTHONUNBUFFERED": "1"}), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for ln in self.proc.stdout or []:
            self.lines.put(ln)

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)

    def ready(self) -> dict[int, tuple[str, int]]:
        """Rank -> (host, pid) from the READY lines so far."""
        found = re.findall(r"READY rank (\d+) host (\S+) pid (\d+)", self.output())
        return {int(r): (h, int(p)) for r, h, p in found}

    def wait_running(self) -> dict[int, tuple[str, int]]:
        """Wait until every rank is READY and the loop runs; return the READY table."""
        deadline = time.monotonic() + 90
        while len(self.ready()) < RANKS or "\nstep 100\n" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)
        return self.ready()

    def stderr_of(self, rank: int) -> str:
        path = self.errdir / f"rank{rank}.err"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def job(errdir: Path) -> Iterator[Job]:
    """Start the job; afterwards kill what is left of it (mpiexec's group, the namespaces)."""
    j = Job(errdir)
    try:
        yield j
    finally:
        if j.proc.poll() is None:
            os.killpg(j.proc.pid, signal.SIGKILL)
            j.proc.wait(timeout=30)
        kill_leftovers()
        j.reader.join(timeout=10)


def job_pids(namespaces: tuple[str, ...] = NAMESPACES) -> dict[str, list[int]]:
    """Processes still running in the cluster's namespaces (agents, proxies, ranks)."""
    found = {ns: netns_pids(ns) for ns in namespaces}
    return {ns: pids for ns, pids in found.items() if pids}


def wait_gone(deadline: float, namespaces: tuple[str, ...] = NAMESPACES) -> dict[str, list[int]]:
    """Poll until no process is left in ``namespaces`` or ``deadline``; return what is left."""
    left = job_pids(namespaces)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = job_pids(namespaces)
    return left


def kill_leftovers() -> int:
    """SIGKILL every process left in the namespaces; return how many there were."""
    pids = [p for ps in job_pids().values() for p in ps]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # also ends a stopped process
        except ProcessLookupError:
            pass
    return len(pids)


def state(pid: int) -> str:
    """The process state letter from /proc (T: stopped), '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def assert_rank0_named_the_node(j: Job) -> None:
    err0 = j.stderr_of(0)
    assert "never answered: rank 2, rank 3. Aborting the job (exit 1)." in err0, err0[-3000:]
    assert "MPI_Abort(MPI_COMM_WORLD, 1)" in err0, err0[-3000:]


def test_cut_link_ends_the_job_with_exit_1(cluster2: Cluster, tmp_path: Path) -> None:
    """Node 2's link set down mid-run: mpiexec exits 1 and no process of the job is left.

    Before: rank 0 aborted the watchdog's duplicate communicator, which MPICH delivers rank by
    rank (for ever, across the cut), the launcher never heard of the abort, and every rank
    spun at full CPU until killed by hand.
    """
    with job(tmp_path) as j:
        ranks = j.wait_running()
        assert [ranks[r][0] for r in range(RANKS)] == ["mpt-node1"] * 2 + ["mpt-node2"] * 2
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", "mpt-node2", "link", "set", "mpt0", "down"], check=True)
        try:
            code = j.proc.wait(timeout=HANG_TIMEOUT + GRACE + 60)
            t_exit = time.monotonic() - t0
            # the cut-off ranks: own watchdog, rank 0 silent, then the exit timer
            limit = HANG_TIMEOUT + GRACE + SILENT_RANK0_S + EXIT_AFTER_ABORT_S + MARGIN
            left = wait_gone(t0 + limit)
            t_gone = time.monotonic() - t0
            killed = kill_leftovers()
        finally:
            subprocess.run(["ip", "-n", "mpt-node2", "link", "set", "mpt0", "up"], check=True)
        print(
            f"cut link: mpiexec exit {code} {t_exit:.1f} s after the cut; last process of "
            f"the job gone after {t_gone:.1f} s; killed by the test: {killed}"
        )
        assert code == 1, j.output()[-3000:]
        assert t_exit < HANG_TIMEOUT + GRACE + MARGIN, t_exit
        assert left == {} and killed == 0, (left, killed)
        assert not any(state(pid) for _host, pid in ranks.values())
        assert_rank0_named_the_node(j)
        errs = {r: j.stderr_of(r) for r in CUT_RANKS}
        for r, err in errs.items():
            assert f"watchdog rank {r}/{RANKS} on mpt-node2: step not done within 3 s" in err, err
        # the launcher cannot reach the node: the first of its ranks to abort ends itself
        # (its proxy may then end the other before that one's own timer does)
        ended_itself = [
            r for r, err in errs.items()
            if f"rank {r} on mpt-node2: MPI_Abort did not end this process within "
            f"{EXIT_AFTER_ABORT_S:g} s" in err
        ]  # fmt: skip
        assert ended_itself, errs


def test_frozen_node_ends_the_job_and_leaves_only_its_stopped_processes(
    cluster2: Cluster, tmp_path: Path
) -> None:
    """Every process of node 2 stopped (SIGSTOP): node 1's ranks end the job, mpiexec exits 1.

    What is left are exactly the stopped processes (agent, proxy, ranks): nothing but SIGKILL
    ends a stopped process, and the launcher's kill waits unread in the frozen proxy's socket
    (mpiexec has exited). Thawed (SIGCONT), they end by themselves within a second.
    """
    with job(tmp_path) as j:
        ranks = j.wait_running()
        frozen = netns_pids("mpt-node2")
        assert {ranks[r][1] for r in CUT_RANKS} <= set(frozen), (ranks, frozen)
        t0 = time.monotonic()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        code = j.proc.wait(timeout=HANG_TIMEOUT + GRACE + 60)
        t_exit = time.monotonic() - t0
        left_up = wait_gone(time.monotonic() + MARGIN, NAMESPACES[:2])
        left_frozen = sorted(netns_pids("mpt-node2"))
        states = {pid: state(pid) for pid in left_frozen}
        t1 = time.monotonic()
        for pid in left_frozen:
            os.kill(pid, signal.SIGCONT)
        left = wait_gone(t1 + MARGIN)
        t_thaw = time.monotonic() - t1
        killed = kill_leftovers()
        print(
            f"frozen node: mpiexec exit {code} {t_exit:.1f} s after SIGSTOP; left behind: "
            f"{len(left_frozen)} stopped processes of mpt-node2 {states}; after SIGCONT all "
            f"gone in {t_thaw:.1f} s; killed by the test: {killed}"
        )
        assert code == 1, j.output()[-3000:]
        assert t_exit < HANG_TIMEOUT + GRACE + MARGIN, t_exit
        assert left_up == {}, left_up  # nothing of node 1 or the head is left
        assert left_frozen == sorted(frozen) and set(states.values()) == {"T"}, states
        assert left == {} and killed == 0, (left, killed)
        assert_rank0_named_the_node(j)
