"""A real Slurm cluster on the emulated nodes: slurmctld on the head, one slurmd per node.

The emulated cluster (docs/cluster.md) must be up. ``start`` writes a slurm.conf of its own
(``STATE/slurm.conf``, ClusterName ``mpt-nodes``; /etc/slurm is never touched), starts
slurmctld in the head namespace (hostname ``mpt-head``, listening on the head's address) and
one ``slurmd -N mpt-nodeI`` inside every node's namespace (hostname ``mpt-nodeI``), each with
its own spool directory, pid file and log (``%n`` in slurm.conf), then waits until every node
is idle. The Slurm clients run on the head too: ``STATE/bin`` holds ``sbatch``, ``scontrol``,
``sinfo``, ``squeue``, ``scancel``, ``srun``, ``sacct`` wrappers that do exactly that, so
``PATH=STATE/bin:$PATH sinfo`` works from the machine's own shell.

Munge is the machine's: started only when no munged answers (recorded in
``STATE/munge.started``) and stopped only then, unless the one-node harness
(tests/slurm/cluster.sh) is running on it by then: its ``munge.started`` marker takes over, so
the last harness standing stops it. ``stop`` cancels our jobs and ends only the daemons whose
pid files are in ``STATE`` (and whose command line names our slurm.conf), then the job steps
left in our namespaces.

By hand (as root):
  python -m mpitrain cluster up --nodes 4 --link 1gbit
  python -m tests.cluster.slurm_nodes start        # idempotent
  PATH=/tmp/mpitrain-slurm-nodes/bin:$PATH sinfo -N
  python -m tests.cluster.slurm_nodes stop
  python -m mpitrain cluster down --kill
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpitrain.cluster import HEAD
from mpitrain.cluster.launch import in_node
from mpitrain.cluster.lifecycle import end_processes

STATE_DIR = Path("/tmp/mpitrain-slurm-nodes")
#: the one-node harness (tests/slurm/cluster.sh) and its state directory
ONE_NODE_STATE = Path("/tmp/mpitrain-slurm")
CLUSTER_NAME = "mpt-nodes"
#: job ids far from the one-node cluster's (both match `slurmstepd: [JOB.` in ps)
FIRST_JOB_ID = 700000
#: advertised CPUs per node (task slots; more than the machine's cores is fine for tests)
CPUS_PER_NODE = 2
CGROUP_CONF = "# written by tests/cluster/slurm_nodes.py (see start())\nCgroupPlugin=cgroup/v1\n"
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "sacct")
#: packages tests/slurm/cluster.sh installs (same list: one install path for both harnesses)
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix-dev")


class CannotRun(RuntimeError):
    """This machine cannot host the Slurm cluster (not root, no Slurm and no apt-get)."""


class HarnessError(RuntimeError):
    """The Slurm cluster did not start or stop as asked (the message holds the log tails)."""


@dataclass(frozen=True)
class Node:
    """One emulated node as ``cluster status --json`` reports it."""

    name: str
    address: str


@dataclass(frozen=True)
class SlurmNodes:
    """The files of one Slurm-on-the-nodes cluster, all under ``state``."""

    state: Path
    nodes: tuple[Node, ...]
    head_address: str

    @property
    def conf(self) -> Path:
        return self.state / "slurm.conf"

    @property
    def bin(self) -> Path:
        """Directory of the client wrappers (they run the real client on the head)."""
        return self.state / "bin"

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def pid_file(self, daemon: str) -> Path:
        """Pid file of ``slurmctld`` or of the slurmd of node ``daemon``."""
        return self.state / ("slurmctld.pid" if daemon == "slurmctld" else f"slurmd-{daemon}.pid")

    def log_file(self, daemon: str) -> Path:
        """Log of ``slurmctld`` or of the slurmd of node ``daemon``."""
        name = "slurmctld.log" if daemon == "slurmctld" else f"slurmd-{daemon}.log"
        return self.state / "log" / name

    def client(self, *argv: str) -> list[str]:
        """Return the argv that runs Slurm client ``argv`` on the head against this cluster."""
        return [str(self.bin / argv[0]), *argv[1:]]

    def log_tails(self, lines: int = 25) -> str:
        """The ends of slurmctld's and every slurmd's log (for failure messages)."""
        return "\n".join(
            f"--- {d} log\n{tail(self.log_file(d), lines)}" for d in ["slurmctld", *self.names]
        )


def tail(path: Path, lines: int = 25) -> str:
    """Return the last ``lines`` lines of ``path`` (or why there are none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _run(argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def emulated_nodes() -> tuple[tuple[Node, ...], str]:
    """Return the emulated cluster's nodes and head address (``cluster status --json``).

    Raises:
        HarnessError: the emulated cluster is not up.
    """
    out = _run([sys.executable, "-m", "mpitrain", "cluster", "status", "--json"])
    info = json.loads(out)
    if not info.get("up"):
        raise HarnessError(
            "the emulated cluster is not up. HINT: python -m mpitrain cluster up --nodes 4"
        )
    nodes = tuple(Node(str(n["name"]), str(n["address"])) for n in info["nodes"])
    return nodes, str(info["head"]["address"])


def install() -> None:
    """Install Slurm and munge with apt-get when missing (as tests/slurm/cluster.sh does).

    Raises:
        CannotRun: not root, no apt-get, or the install failed.
    """
    have = all(shutil.which(t) for t in ("slurmctld", "slurmd", "srun", "munged"))
    if have and list(Path("/usr/lib").glob("*/libpmix.so")):
        return
    if os.geteuid() != 0:
        raise CannotRun("Slurm is missing and installing it needs root")
    if shutil.which("apt-get") is None:
        raise CannotRun("Slurm is missing and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode == 0:
            return
    raise CannotRun(f"apt-get install {' '.join(APT_PACKAGES)} failed: {proc.stderr[-500:]}")


def render_conf(cl: SlurmNodes) -> str:
    """Return slurm.conf for ``cl``: controller on the head, one NodeName per emulated node."""
    s = cl.state
    nodes = "\n".join(
        f"NodeName={n.name} NodeAddr={n.address} NodeHostname={n.name} CPUs={CPUS_PER_NODE} "
        "RealMemory=1000 State=UNKNOWN"
        for n in cl.nodes
    )
    return f"""\
# written by tests/cluster/slurm_nodes.py: Slurm across the emulated nodes (docs/cluster.md)
ClusterName={CLUSTER_NAME}
SlurmctldHost={HEAD}({cl.head_address})
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# least loaded node first: an array's tasks spread over the nodes instead of filling node 1
SelectTypeParameters=CR_Core,CR_LLN
MpiDefault=pmi2
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
FirstJobId={FIRST_JOB_ID}
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={cl.pid_file("slurmctld")}
SlurmdPidFile={s}/slurmd-%n.pid
SlurmctldLogFile={cl.log_file("slurmctld")}
SlurmdLogFile={s}/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
{nodes}
PartitionName=nodes Nodes={",".join(cl.names)} Default=YES MaxTime=INFINITE State=UP
"""


def client_wrapper(cl: SlurmNodes, tool: str) -> str:
    """Return a wrapper script running Slurm client ``tool`` on the head (hostname mpt-head)."""
    real = shutil.which(tool, path="/usr/bin:/usr/sbin:/usr/local/bin") or f"/usr/bin/{tool}"
    argv = shlex.join(in_node(HEAD, HEAD, [real]))
    return (
        f"#!/bin/sh\n# {tool} on the emulated head against {cl.conf} (slurm_nodes.py)\n"
        f'SLURM_CONF={shlex.quote(str(cl.conf))} exec {argv} "$@"\n'
    )


def _pid(path: Path, conf: Path) -> int | None:
    """The pid in ``path`` when that process runs with our ``conf`` on its command line."""
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(conf).encode() in cmdline else None


def _munge_ok() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
    return check.returncode == 0


def start_munge(state: Path) -> None:
    """Start the machine's munged unless one answers; record that we started it."""
    if _munge_ok():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        if subprocess.run(["/usr/sbin/mungekey", "-c"], capture_output=True).returncode != 0:
            _run(["/usr/sbin/create-munge-key", "-f"])
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "munge:", "/run/munge", "/var/log/munge", "/var/lib/munge", str(key)],
                   capture_output=True)  # fmt: skip
    _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    (state / "munge.started").write_text("started\n")
    for _ in range(50):
        if _munge_ok():
            return
        time.sleep(0.1)
    raise HarnessError("munged started but does not answer: see /var/log/munge/munged.log")


def stop_munge(state: Path) -> str:
    """Stop munged if we started it and the one-node harness is not using it; say what was done."""
    marker = state / "munge.started"
    if not marker.exists():
        return "munge: not started here, left alone"
    marker.unlink()
    one_node = [ONE_NODE_STATE / f"{d}.pid" for d in ("slurmctld", "slurmd")]
    if any(_alive_pid_file(p) for p in one_node):
        (ONE_NODE_STATE / "munge.started").write_text("started (handed over by slurm_nodes)\n")
        return "munge: the one-node harness still uses it: handed over to it"
    try:
        os.kill(int(Path("/run/munge/munged.pid").read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError, IndexError) as exc:
        return f"munge: could not stop it ({exc})"
    return "munge: stopped"


def _alive_pid_file(path: Path) -> bool:
    try:
        os.kill(int(path.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _spawn(argv: list[str], log: Path) -> None:
    """Run a daemon's start command (it forks into the background) with output to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              start_new_session=True, timeout=60)  # fmt: skip
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} -> {proc.returncode}:\n{tail(log)}")


def node_states(cl: SlurmNodes) -> dict[str, str]:
    """Return each node's state as sinfo reports it ({} while slurmctld does not answer)."""
    proc = subprocess.run(cl.client("sinfo", "-h", "-N", "-o", "%N %T"),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if proc.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)


def start(state: Path = STATE_DIR, timeout: float = 60) -> SlurmNodes:
    """Start slurmctld on the head and a slurmd on every node (idempotent); wait until idle.

    Raises:
        CannotRun: not root, or Slurm cannot be installed.
        HarnessError: a daemon failed or a node did not become idle (with the log tails).
    """
    if os.geteuid() != 0:
        raise CannotRun("the Slurm daemons run as SlurmUser=root")
    install()
    nodes, head_address = emulated_nodes()
    cl = SlurmNodes(state, nodes, head_address)
    for sub in ("ctld", "log", "bin", *(f"spool/{n}" for n in cl.names)):
        (state / sub).mkdir(parents=True, exist_ok=True)
    start_munge(state)
    cl.conf.write_text(render_conf(cl))
    # (beside slurm.conf, where Slurm looks for it) `ip netns exec` mounts a fresh /sys with
    # nothing on /sys/fs/cgroup, so the default CgroupPlugin=autodetect fails ("No filesystem
    # mounted on /sys/fs/cgroup") and slurmd exits; with proctrack/linuxproc and task/none no
    # cgroup is ever used, and the v1 plugin loads without probing the mount
    (state / "cgroup.conf").write_text(CGROUP_CONF)
    for tool in CLIENTS:
        path = cl.bin / tool
        path.write_text(client_wrapper(cl, tool))
        path.chmod(0o755)
    if _pid(cl.pid_file("slurmctld"), cl.conf) is None:
        # -c: forget the jobs of an earlier run (a fresh cluster each start)
        argv = in_node(HEAD, HEAD, ["slurmctld", "-c", "-f", str(cl.conf)])
        _spawn(argv, state / "log" / "slurmctld.out")
    for n in cl.names:
        if _pid(cl.pid_file(n), cl.conf) is None:
            argv = in_node(n, n, ["slurmd", "-N", n, "-f", str(cl.conf)])
            _spawn(argv, state / "log" / f"slurmd-{n}.out")
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = node_states(cl)
        alive = all(_pid(cl.pid_file(n), cl.conf) is not None for n in cl.names)
        ready = all(states.get(n) in ("idle", "mixed", "allocated") for n in cl.names)
        if alive and ready:
            return cl
        for n, st in states.items():
            if st.startswith(("down", "drain")):
                subprocess.run(cl.client("scontrol", "update", f"NodeName={n}", "State=RESUME"),
                               capture_output=True, timeout=30)  # fmt: skip
        time.sleep(0.3)
    raise HarnessError(f"nodes not idle after {timeout}s: {states}\n{cl.log_tails()}")


def _pids_in_netns(name: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _end(pids: list[int], timeout: float = 15) -> None:
    """TERM ``pids``, KILL what is still there after ``timeout`` seconds."""
    end_processes(pids, term_wait=timeout, kill_wait=timeout)


def stop(state: Path = STATE_DIR) -> str:
    """Stop what :func:`start` started under ``state`` (nothing else); return what was done."""
    conf = state / "slurm.conf"
    done: list[str] = []
    ctld_up = _pid(state / "slurmctld.pid", conf) is not None
    if ctld_up and (state / "bin" / "scancel").exists():
        subprocess.run([str(state / "bin" / "scancel"), "--full", "-u", "root"],
                       capture_output=True, timeout=30)  # fmt: skip
    pids = {p.name: pid for p in sorted(state.glob("slurm*.pid"))
            if (pid := _pid(p, conf)) is not None}  # fmt: skip
    # slurmds first (they may still be ending steps), then the controller
    _end([pid for name, pid in pids.items() if name != "slurmctld.pid"])
    _end([pid for name, pid in pids.items() if name == "slurmctld.pid"])
    done += [f"stopped {name.removesuffix('.pid')}" for name in pids]
    # job steps of our slurmds left running (their namespaces are ours, so are they)
    names = [p.name.removeprefix("slurmd-").removesuffix(".pid")
             for p in state.glob("slurmd-*.pid")]  # fmt: skip
    steps = [pid for n in names for pid in _pids_in_netns(n) if _comm(pid) == "slurmstepd"]
    if steps:
        _end(steps, timeout=5)
        done.append(f"ended {len(steps)} slurmstepd")
    done.append(stop_munge(state))
    return "; ".join(done)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.cluster.slurm_nodes start|stop|status [--state DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.slurm_nodes")
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--state", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cl = start(args.state)
            print(f"slurm_nodes: {len(cl.nodes)} nodes idle; clients: PATH={cl.bin}:$PATH")
        elif args.command == "stop":
            print(f"slurm_nodes: {stop(args.state)}")
        else:
            sinfo = args.state / "bin" / "sinfo"
            return subprocess.run([str(sinfo), "-N"], timeout=30).returncode
    except CannotRun as exc:
        print(f"slurm_nodes: cannot run here: {exc}", file=sys.stderr)
        return 3
    except HarnessError as exc:
        print(f"slurm_nodes: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
