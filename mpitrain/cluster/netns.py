"""Namespace, veth, bridge and qdisc plumbing: thin wrappers over `ip` and `tc` (iproute2).

Every call names its namespace with ``ip -n NETNS``; nothing here changes the machine's own
(root) network namespace: the only root-namespace calls are reads (addresses, routes).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mpitrain.cluster import ClusterError
from mpitrain.errors import with_hint

NETNS_DIR = Path("/run/netns")
#: `tc` rate units (SI, as tc reads them) -> bits per second
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
#: the queue a tbf may hold before dropping, as time at the link rate
TBF_LATENCY = "50ms"


def run(argv: list[str], *, timeout: float = 30.0, check: bool = True) -> str:
    """Run a command, return its stdout; a failure raises ClusterError naming the command."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(
            with_hint(f"`{' '.join(argv)}` did not finish in {timeout:g} s", "retry")
        ) from None
    if check and proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise ClusterError(
            with_hint(
                f"`{' '.join(argv)}` failed: {err[-1] if err else f'exit {proc.returncode}'}",
                "see docs/cluster.md (needs root, iproute2 and kernel netns/veth/bridge/tbf)",
            )
        )
    return proc.stdout


def check_tools() -> None:
    """Raise ClusterError unless this is root with `ip`, `tc` and `unshare` available."""
    if os.geteuid() != 0:
        raise ClusterError(
            with_hint("the emulated cluster needs root", "run it as root (e.g. with sudo)")
        )
    missing = [t for t in ("ip", "tc", "unshare") if shutil.which(t) is None]
    if missing:
        raise ClusterError(
            with_hint(
                f"{', '.join(missing)} not found",
                "install iproute2 (ip, tc) and util-linux (unshare)",
            )
        )


# ---------------------------------------------------------------------- rates


def parse_rate(text: str) -> int | None:
    """Return a link rate in bit/s (``1gbit``, ``2.5gbit``, ``100mbit``); None for ``none``.

    Raises:
        ClusterError: not a rate.
    """
    t = text.strip().lower()
    if t == "none":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)", t)
    if m is None or float(m.group(1)) <= 0:
        raise ClusterError(
            with_hint(f"link rate {text!r} is not understood", "use e.g. 1gbit, 10gbit, 100mbit "
                      "or none (unlimited)")
        )
    return int(float(m.group(1)) * UNITS[m.group(2)])


def tbf_burst(bits_per_s: int) -> int:
    """Bucket size in bytes: 2 ms at the link rate, at least 64 KiB (one GSO segment)."""
    return max(bits_per_s // 8 // 500, 64 << 10)


def set_rate(netns: str, dev: str, bits_per_s: int | None) -> None:
    """Limit ``dev``'s egress to ``bits_per_s`` with tbf (None: remove our limit)."""
    if bits_per_s is None:
        if "tbf" in qdisc(netns, dev):
            run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"])
        return
    run(
        [
            "tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{bits_per_s}bit", "burst", str(tbf_burst(bits_per_s)),
            "latency", TBF_LATENCY,
        ]
    )  # fmt: skip


def qdisc(netns: str, dev: str) -> str:
    """Return the root qdisc line of ``dev`` (``tc qdisc show``)."""
    out = run(["tc", "-n", netns, "qdisc", "show", "dev", dev, "root"], check=False)
    return out.strip().splitlines()[0] if out.strip() else ""


# ---------------------------------------------------------------------- namespaces


def list_netns() -> set[str]:
    """Names of all named network namespaces on the machine (``ip netns list``)."""
    out = run(["ip", "-j", "netns", "list"]).strip()
    if not out:
        return set()
    return {str(ns["name"]) for ns in json.loads(out)}


def netns_inode(name: str) -> int:
    """Identity of a named namespace (nsfs inode behind ``/run/netns/NAME``); 0 when absent."""
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return 0


def add_netns(name: str) -> int:
    """Create a named network namespace with its loopback up; return its inode."""
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return netns_inode(name)


def del_netns(name: str) -> None:
    """Delete a named namespace (its links, and their veth peers, go with it)."""
    run(["ip", "netns", "del", name])


def netns_pids(name: str) -> list[int]:
    """Processes running inside a named namespace."""
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.split()]


# ---------------------------------------------------------------------- links


def link_exists(netns: str, dev: str) -> bool:
    """True when ``dev`` exists in ``netns``."""
    out = subprocess.run(
        ["ip", "-n", netns, "link", "show", "dev", dev], capture_output=True, timeout=30
    )
    return out.returncode == 0


def add_bridge(netns: str, dev: str) -> None:
    """Create a bridge (no STP: ports forward at once)."""
    run(["ip", "-n", netns, "link", "add", dev, "type", "bridge", "stp_state", "0"])


def add_veth(netns: str, dev: str, peer_netns: str, peer: str) -> None:
    """Create a veth pair with one end in each namespace (never in the root namespace)."""
    run(
        ["ip", "-n", netns, "link", "add", dev, "type", "veth",
         "peer", "name", peer, "netns", peer_netns]
    )  # fmt: skip


def link_up(netns: str, dev: str, *, master: str | None = None) -> None:
    """Bring ``dev`` up, enslaved to bridge ``master`` when given."""
    extra = ["master", master] if master else []
    run(["ip", "-n", netns, "link", "set", "dev", dev, *extra, "up"])


def set_address(netns: str, dev: str, cidr: str) -> None:
    """Give ``dev`` exactly the address ``cidr`` (idempotent)."""
    run(["ip", "-n", netns, "addr", "replace", cidr, "dev", dev])


def counters(netns: str, dev: str) -> dict[str, int]:
    """Byte and packet counters of ``dev`` (``tx_bytes``, ``rx_bytes``, ``tx_packets`` ...)."""
    out = run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", dev])
    stats: dict[str, Any] = json.loads(out)[0]["stats64"]
    return {f"{d}_{k}": int(v) for d in ("tx", "rx") for k, v in stats[d].items()
            if k in ("bytes", "packets", "dropped")}


# ---------------------------------------------------------------------- root namespace (read)


def root_conflicts(subnet: ipaddress.IPv4Network) -> list[str]:
    """Addresses and routes of the root namespace that overlap ``subnet`` (read only)."""
    found: list[str] = []
    for entry in json.loads(run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for a in entry.get("addr_info", []):
            net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if net.overlaps(subnet):
                found.append(f"address {a['local']}/{a['prefixlen']} on {entry['ifname']}")
    for r in json.loads(run(["ip", "-j", "-4", "route", "show"]) or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            if net.overlaps(subnet):
                found.append(f"route {dst} via {r.get('dev', '?')}")
    return found
