"""`python -m mpitrain cluster up|mpiexec|exec|status|down`: an emulated cluster on one machine."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mpitrain.cluster import HEAD, MAX_NODES, PREFIX, ClusterError, lifecycle, netns
from mpitrain.cluster.launch import (
    NETMODS,
    find_mpiexec,
    in_node,
    mpi_flavor,
    mpiexec_argv,
    openmpi_argv,
    placement,
    quoted,
    ulfm_mpirun,
)
from mpitrain.cluster.state import STATE_DIR
from mpitrain.errors import with_hint

EPILOG = """\
Each node is a network namespace with its own hostname, linked to a bridge at RATE in both
directions (tbf). Needs root. Example:
  python -m mpitrain cluster up --nodes 2 --link 1gbit
  python -m mpitrain cluster mpiexec -n 4 --per-node 2 -- python -m mpitrain --epochs 2
  python -m mpitrain cluster mpiexec --ulfm -n 4 -- python -m mpitrain --on-rank-loss shrink
  python -m mpitrain cluster status
  python -m mpitrain cluster down
See docs/cluster.md.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the cluster command."""
    parser = argparse.ArgumentParser(
        prog="python -m mpitrain cluster",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up", help="create the nodes (idempotent; changes the rate if up)")
    u.add_argument("--nodes", type=int, required=True, help=f"number of nodes, 1..{MAX_NODES}")
    u.add_argument("--link", default="none", help="rate per link: 1gbit, 10gbit, 100mbit, none")
    u.add_argument("--subnet", default=lifecycle.DEFAULT_SUBNET, help="private /24 to use")
    m = sub.add_parser("mpiexec", help="run an MPI job across the nodes: mpiexec ... -- CMD")
    m.add_argument("-n", type=int, required=True, dest="ranks", help="number of ranks")
    m.add_argument("--per-node", type=int, help="ranks per node (default: spread over all)")
    m.add_argument(
        "--netmod",
        choices=sorted(NETMODS),
        help="MPICH: how inter-node traffic moves: ofi or ucx, both TCP over the links "
        "(default ofi); shm = MPICH's own choice, which bypasses the links (comparison only). "
        "Open MPI needs none (its TCP transport already uses the links)",
    )
    m.add_argument(
        "--ulfm",
        action="store_true",
        help="Open MPI with fault tolerance (mpirun --with-ft ulfm): the survivors of lost "
        "ranks or a lost node can go on (python -m mpitrain --on-rank-loss shrink). Uses "
        "MPITRAIN_MPIEXEC when it is Open MPI's, else the one make setup installs",
    )
    m.add_argument("--print", action="store_true", help="print the command line, run nothing")
    e = sub.add_parser("exec", help="run a command on one node: exec NODE -- CMD")
    e.add_argument("node", help="mpt-node1 (or node1, 1), or head")
    s = sub.add_parser("status", help="nodes, link rate, bytes sent per link")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    d = sub.add_parser("down", help="remove everything `up` created (idempotent)")
    d.add_argument("--kill", action="store_true", help="end processes still on the nodes")
    return parser


def main(argv: list[str]) -> int:
    """Run the cluster command; returns the exit code."""
    args, command = list(argv), []
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :]
    ns = build_parser().parse_args(args)
    try:
        return _dispatch(ns, command)
    except (ClusterError, OSError) as exc:
        sys.stderr.write(f"mpitrain cluster: error: {exc}\n")
        return exc.exit_code if isinstance(exc, ClusterError) else 1


def _dispatch(ns: argparse.Namespace, command: list[str]) -> int:
    if ns.action in ("mpiexec", "exec") and not command:
        raise ClusterError(
            with_hint(f"`cluster {ns.action}` needs a command", f"cluster {ns.action} ... -- CMD")
        )
    if ns.action == "up":
        print(lifecycle.up(ns.nodes, ns.link, ns.subnet, STATE_DIR))
        return 0
    if ns.action == "down":
        for note in lifecycle.down(STATE_DIR, kill=ns.kill):
            print(note)
        return 0
    if ns.action == "status":
        netns.check_tools()
        info = lifecycle.status(STATE_DIR)
        print(json.dumps(info, indent=1) if ns.json else _describe(info))
        return 0
    info = _ready()
    nodes = [r["name"] for r in info["nodes"]]
    if ns.action == "exec":
        name = _resolve(ns.node, nodes)
        return _run(in_node(name, name, command), False)
    slots = placement(ns.ranks, ns.per_node, nodes)
    agent = Path(info["agent"])
    exe = find_mpiexec()
    if ns.ulfm:
        exe = ulfm_mpirun(exe)
    elif exe is None:
        raise ClusterError(
            with_hint("mpiexec not found", "pip install mpich, or set MPITRAIN_MPIEXEC")
        )
    if ns.ulfm or mpi_flavor(exe) == "openmpi":
        if ns.netmod is not None:
            raise ClusterError(
                with_hint("--netmod is for MPICH", "drop it: Open MPI's TCP transport is used")
            )
        return _run(openmpi_argv(exe, agent, slots, command, ulfm=ns.ulfm), ns.print)
    argv = mpiexec_argv(exe, agent, slots, command, netmod=ns.netmod or "ofi")
    return _run(argv, ns.print)


def _ready() -> dict[str, Any]:
    """Status of a complete cluster (root needed to enter it), else ClusterError."""
    netns.check_tools()
    info = lifecycle.status(STATE_DIR)
    if not info["up"]:
        raise ClusterError(
            with_hint("no cluster is up", "python -m mpitrain cluster up --nodes 2")
        )
    if not info["complete"]:
        raise ClusterError(
            with_hint("the cluster is incomplete (a namespace or link is missing)",
                      f"repair it with `cluster up --nodes {len(info['nodes'])}` or remove it "
                      "with `cluster down`")
        )
    return info


def _resolve(node: str, nodes: list[str]) -> str:
    """Map ``mpt-node2``, ``node2``, ``2`` or ``head`` to a namespace of this cluster."""
    if node in ("head", HEAD):
        return HEAD
    name = node if node.startswith(PREFIX) else f"{PREFIX}node{node.removeprefix('node')}"
    if name not in nodes:
        raise ClusterError(
            with_hint(f"{node!r} is not a node of this cluster", f"use one of {', '.join(nodes)}"
                      " or head")
        )
    return name


def _run(argv: list[str], dry: bool) -> int:
    """Print ``argv`` (dry run) or replace this process with it (its exit code is ours)."""
    if dry:
        print(quoted(argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


def _describe(info: dict[str, Any]) -> str:
    """Human-readable status."""
    if not info["up"]:
        return f"cluster: not up (no state file at {info['state']})"
    head = info["head"]
    lines = [
        f"cluster: {len(info['nodes'])} nodes, link {_link(info['link'])}, subnet "
        f"{info['subnet']}, head {head['name']} {head['address']}"
        + ("" if info["complete"] else "  INCOMPLETE: run `cluster up` again or `cluster down`"),
        f"mpiexec across the nodes (for MPITRAIN_MPIEXEC): {info['mpiexec']}",
        f"{'node':<12}{'address':<14}{'sent B':>14}{'received B':>14}{'loopback B':>12}  qdisc",
    ]
    for r in info["nodes"]:
        if not r["present"]:
            lines.append(f"{r['name']:<12}{r['address']:<14}{'MISSING':>14}")
            continue
        lines.append(
            f"{r['name']:<12}{r['address']:<14}{r['sent_bytes']:>14}{r['received_bytes']:>14}"
            f"{r['loopback_bytes']:>12}  {_rate(r['qdisc'])}"
        )
    return "\n".join(lines)


def _rate(qdisc: str) -> str:
    """``tbf 1Gbit`` from a ``tc qdisc show`` line; ``unlimited`` without a tbf."""
    words = qdisc.split()
    if "tbf" in words and "rate" in words:
        return f"tbf {words[words.index('rate') + 1]}"
    return "unlimited"


def _link(rate: str) -> str:
    """The configured rate in words."""
    return "unlimited" if rate == "none" else f"{rate} each way"
