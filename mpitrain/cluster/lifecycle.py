"""Bring the emulated cluster up, report on it, take it down (the logic behind the CLI).

Layout (docs/cluster.md): namespace ``mpt-head`` holds the bridge ``mpt0`` (address .254 of
the cluster subnet) and one veth end ``mpt-vI`` per node; node ``mpt-nodeI`` holds the other
end, named ``mpt0``, with address .I. Both ends carry a tbf qdisc at the link rate, so each
link is limited in both directions. There is no default route anywhere and nothing in the
machine's own namespace: the nodes reach each other and the head, nothing else.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpitrain.cluster import HEAD, IFACE, MAX_NODES, PREFIX, ClusterError, hosts, netns, node_name
from mpitrain.cluster.launch import agent_script, find_mpiexec, wrapper_script
from mpitrain.cluster.state import STATE_DIR, Item, State, locked, state_path
from mpitrain.errors import with_hint

DEFAULT_SUBNET = "10.213.0.0/24"
HEAD_HOST = 254


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """Return the cluster subnet: a private IPv4 /24."""
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise ClusterError(with_hint(f"--subnet {text!r}: {exc}", "e.g. 10.213.0.0/24")) from None
    if net.prefixlen != 24 or not net.is_private:
        raise ClusterError(with_hint(f"--subnet {text} is not a private /24", "e.g. 10.213.0.0/24"))
    return net


def veth_name(index: int) -> str:
    """Name of node ``index``'s link end on the bridge (in the head namespace)."""
    return f"{PREFIX}v{index}"


def agent_path(state_dir: Path = STATE_DIR) -> Path:
    """Where `up` writes the launcher agent."""
    return state_dir / "agent"


def wrapper_path(state_dir: Path = STATE_DIR) -> Path:
    """Where `up` writes the mpiexec-compatible wrapper (``MPITRAIN_MPIEXEC=...``)."""
    return state_dir / "mpiexec"


def _is_ours(st: State, name: str) -> bool:
    """True when namespace ``name`` is the one recorded in the state (same inode)."""
    item = st.find("netns", name)
    return item is not None and (item.inode == 0 or item.inode == netns.netns_inode(name))


def _check_free(st: State, names: list[str], subnet: ipaddress.IPv4Network) -> None:
    """Refuse to go on when a name we would create exists but is not ours."""
    existing = netns.list_netns()
    foreign = [n for n in names if n in existing and not _is_ours(st, n)]
    if foreign:
        raise ClusterError(
            with_hint(
                f"namespace {', '.join(foreign)} exists but was not created by this tool "
                f"(not in {st.path})",
                f"remove it yourself (`ip netns del {foreign[0]}`) if it is a leftover; "
                "this tool touches only what it recorded",
            )
        )
    clash = netns.root_conflicts(subnet)
    if clash:
        raise ClusterError(
            with_hint(f"subnet {subnet} is in use on this machine: {'; '.join(clash)}",
                      "pick a free private /24 with --subnet")
        )
    theirs = hosts.foreign(hosts.HOSTS, names)
    if theirs:
        raise ClusterError(
            with_hint(f"{hosts.HOSTS} already names a cluster host outside our block: "
                      f"{theirs[0]!r}", "remove that line")
        )


def _ensure_netns(st: State, name: str, made: list[str]) -> None:
    """Create namespace ``name`` unless our recorded one exists."""
    if name in netns.list_netns():
        return  # checked to be ours by _check_free
    item = st.find("netns", name) or st.record(Item("netns", name))
    item.inode = netns.add_netns(name)
    st.save()
    made.append(name)


def _ensure_link(
    st: State, ns: str, dev: str, create: Callable[[], None], made: list[str], peer: str = ""
) -> None:
    """Create link ``dev`` in our namespace ``ns`` unless it exists (recorded first)."""
    item = st.find("link", dev, ns)
    if netns.link_exists(ns, dev):
        if item is None:
            raise ClusterError(
                with_hint(f"link {dev} in namespace {ns} was not created by this tool",
                          "run `python -m mpitrain cluster down`, then `up` again")
            )
        return
    item = item or st.record(Item("link", dev, netns=ns, peer=peer))
    try:
        create()
    except ClusterError:
        st.forget(item)
        raise
    made.append(f"{ns}/{dev}")


def up(nodes: int, link: str = "none", subnet: str = DEFAULT_SUBNET,
       state_dir: Path = STATE_DIR) -> str:
    """Create (or complete, or re-rate) the cluster; return a one-line summary.

    Raises:
        ClusterError: not root, a name or the subnet is taken, or a different cluster is up.
    """
    netns.check_tools()
    rate = netns.parse_rate(link)
    net = parse_subnet(subnet)
    if not 1 <= nodes <= MAX_NODES:
        raise ClusterError(with_hint(f"--nodes {nodes} is out of range", f"use 1..{MAX_NODES}"))
    names = [node_name(i) for i in range(1, nodes + 1)]
    with locked(state_dir):
        st = State.load(state_path(state_dir)) or State(state_path(state_dir))
        if st.nodes and (st.nodes != names or st.subnet != str(net)):
            raise ClusterError(
                with_hint(f"a cluster of {len(st.nodes)} nodes on {st.subnet} is up",
                          "run `python -m mpitrain cluster down` first")
            )
        _check_free(st, [HEAD, *names], net)
        old_link = st.link if st.nodes else None
        st.nodes, st.subnet = names, str(net)
        st.save()
        made: list[str] = []
        _build(st, net, rate, made, state_dir)
        st.link = link.strip().lower()
        st.save()
    what = f"{nodes} nodes ({' '.join(names)}), link {st.link}, head {HEAD} {net[HEAD_HOST]}"
    if not made and old_link == st.link:
        return f"cluster already up: {what}"
    if not made:
        return f"cluster up: link rate {old_link} -> {st.link}: {what}"
    return f"cluster up: {what}"


def _build(st: State, net: ipaddress.IPv4Network, rate: int | None, made: list[str],
           state_dir: Path) -> None:
    """Create what is missing and (re)apply addresses, state and rates to everything."""
    _ensure_netns(st, HEAD, made)
    _ensure_link(st, HEAD, IFACE, lambda: netns.add_bridge(HEAD, IFACE), made)
    netns.set_address(HEAD, IFACE, f"{net[HEAD_HOST]}/{net.prefixlen}")
    netns.link_up(HEAD, IFACE)
    for i, node in enumerate(st.nodes, 1):
        _ensure_netns(st, node, made)
        veth = veth_name(i)
        add = functools.partial(netns.add_veth, HEAD, veth, node, IFACE)
        _ensure_link(st, HEAD, veth, add, made, peer=f"{node}/{IFACE}")
        netns.set_address(node, IFACE, f"{net[i]}/{net.prefixlen}")
        netns.link_up(node, IFACE)
        netns.link_up(HEAD, veth, master=IFACE)
        netns.set_rate(node, IFACE, rate)  # node -> bridge
        netns.set_rate(HEAD, veth, rate)  # bridge -> node
    entries = [(str(net[HEAD_HOST]), HEAD)] + [(str(net[i]), n) for i, n in enumerate(st.nodes, 1)]
    if hosts.block(hosts.HOSTS) is None:
        made.append(str(hosts.HOSTS))
    if st.find("hosts", str(hosts.HOSTS)) is None:
        st.record(Item("hosts", str(hosts.HOSTS)))
    hosts.write_block(hosts.HOSTS, entries)
    real = find_mpiexec() or "mpiexec"
    if Path(real).resolve() == wrapper_path(state_dir).resolve():  # MPITRAIN_MPIEXEC=wrapper
        beside = Path(sys.executable).parent / "mpiexec"
        real = str(beside) if beside.exists() else "mpiexec"
    for path, text in (
        (agent_path(state_dir), agent_script(st.nodes)),
        (wrapper_path(state_dir), wrapper_script(real, sys.executable)),
    ):
        if st.find("file", str(path)) is None:
            st.record(Item("file", str(path)))
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
            made.append(str(path))


def _stop_processes(st: State, kill: bool) -> list[str]:
    """End processes still running in our namespaces (only with ``kill``); return notes."""
    busy = {ns: pids for ns in st.namespaces() if _is_ours(st, ns) and
            (pids := netns.netns_pids(ns))}  # fmt: skip
    if not busy:
        return []
    listing = "; ".join(f"{ns}: pids {' '.join(map(str, p))}" for ns, p in busy.items())
    if not kill:
        raise ClusterError(
            with_hint(f"processes still run on the cluster ({listing})",
                      "let the job finish, or run `python -m mpitrain cluster down --kill`")
        )
    end_processes([p for pids in busy.values() for p in pids])
    return [f"killed {listing}"]


def end_processes(pids: list[int], term_wait: float = 3.0, kill_wait: float = 5.0) -> list[int]:
    """TERM ``pids``, KILL those still running after ``term_wait`` s; return any left after
    ``kill_wait`` more seconds (zombies count as ended)."""
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return pids


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def down(state_dir: Path = STATE_DIR, *, kill: bool = False) -> list[str]:
    """Remove everything the state file records (what is left of it); return notes.

    Namespaces with our prefix that the state file does not record are left alone (named in
    the notes). Idempotent: without a state file there is nothing to do.
    """
    netns.check_tools()
    with locked(state_dir):
        st = State.load(state_path(state_dir))
        if st is None:
            return ["cluster: nothing to remove (no state file)", *_strangers(None)]
        notes = _stop_processes(st, kill)
        for item in reversed(list(st.items)):
            notes += _remove(st, item)
            st.forget(item)
        st.remove()
        return [*notes, "cluster down", *_strangers(st)]


def _remove(st: State, item: Item) -> list[str]:
    """Remove one recorded object if it is still there and still ours."""
    if item.kind == "file":
        Path(item.name).unlink(missing_ok=True)
    elif item.kind == "hosts":
        hosts.remove_block(Path(item.name))
    elif item.kind == "netns" and item.name in netns.list_netns():
        if not _is_ours(st, item.name):
            return [f"left namespace {item.name} alone: it was re-created by someone else"]
        netns.del_netns(item.name)
    # links live in our namespaces and go with them (a veth with either end's namespace)
    return []


def _strangers(st: State | None) -> list[str]:
    """Notes on namespaces with our prefix that we did not create (and do not touch)."""
    mine = set(st.namespaces()) if st is not None else set()
    other = sorted(n for n in netns.list_netns() if n.startswith(PREFIX) and n not in mine)
    return [f"left alone (not created by this tool): {' '.join(other)}"] if other else []


def status(state_dir: Path = STATE_DIR) -> dict[str, Any]:
    """Collect the cluster's layout and per-link counters (no changes)."""
    st = State.load(state_path(state_dir))
    if st is None or not st.nodes:
        return {"up": False, "state": str(state_path(state_dir))}
    net = ipaddress.IPv4Network(st.subnet)
    present = netns.list_netns()
    rows = []
    for i, node in enumerate(st.nodes, 1):
        row: dict[str, Any] = {"name": node, "address": str(net[i]), "link": veth_name(i)}
        ok = node in present and HEAD in present and netns.link_exists(node, IFACE)
        row["present"] = ok
        if ok:
            c = netns.counters(node, IFACE)
            row.update(sent_bytes=c["tx_bytes"], received_bytes=c["rx_bytes"],
                       dropped=c["tx_dropped"] + c["rx_dropped"],
                       loopback_bytes=netns.counters(node, "lo")["tx_bytes"],
                       qdisc=netns.qdisc(node, IFACE))
        rows.append(row)
    return {
        "up": True,
        "state": str(st.path),
        "link": st.link,
        "subnet": st.subnet,
        "head": {"name": HEAD, "address": str(net[HEAD_HOST]), "present": HEAD in present},
        "iface": IFACE,
        "agent": str(agent_path(state_dir)),
        "mpiexec": str(wrapper_path(state_dir)),
        "nodes": rows,
        "complete": HEAD in present and all(r["present"] for r in rows),
    }
