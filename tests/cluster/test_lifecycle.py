"""`cluster up/status/exec/down`: idempotent, crash-safe, and never touching foreign names."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from mpitrain.cluster import hosts
from mpitrain.cluster.state import STATE_DIR, Item, State, state_path
from tests.cluster.conftest import cli, down, status


def sh(*argv: str, check: bool = True) -> str:
    """Run a plumbing command (the test's own, e.g. a foreign namespace)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    assert not check or proc.returncode == 0, proc.stderr
    return proc.stdout


def our_netns() -> set[str]:
    return {ln.split()[0] for ln in sh("ip", "netns", "list").splitlines() if ln.startswith("mpt-")}


def root_view() -> tuple[str, str, str]:
    """The root namespace's links, addresses and routes (the tool must leave them alone)."""
    return sh("ip", "-br", "link"), sh("ip", "-br", "addr"), sh("ip", "route")


@pytest.fixture()
def clean(cluster_ok: None) -> Iterator[list[str]]:
    """No cluster before and after the test; names in the yielded list are the test's own
    foreign namespaces, deleted at the end."""
    foreign: list[str] = []
    try:
        yield foreign
    finally:
        down()
        for name in foreign:
            sh("ip", "netns", "del", name, check=False)


def test_up_status_down_idempotent(clean: list[str]) -> None:
    before = root_view()
    out = cli("up", "--nodes", "2", "--link", "1gbit").stdout
    assert out.startswith("cluster up: 2 nodes"), out
    assert "already up" in cli("up", "--nodes", "2", "--link", "1gbit").stdout
    assert root_view() == before  # nothing in the machine's own namespace
    info = status()
    assert info["complete"] and info["link"] == "1gbit"
    assert [r["name"] for r in info["nodes"]] == ["mpt-node1", "mpt-node2"]
    assert all("tbf" in r["qdisc"] and "1Gbit" in r["qdisc"] for r in info["nodes"])
    assert our_netns() == {"mpt-head", "mpt-node1", "mpt-node2"}
    assert hosts.block(hosts.HOSTS) == [
        "10.213.0.254 mpt-head", "10.213.0.1 mpt-node1", "10.213.0.2 mpt-node2",
    ]  # fmt: skip
    # each node: own hostname, its address, no route out of the cluster subnet
    assert cli("exec", "node2", "--", "hostname").stdout.strip() == "mpt-node2"
    routes = cli("exec", "mpt-node1", "--", "ip", "route").stdout
    assert "default" not in routes and "10.213.0.0/24 dev mpt0" in routes, routes
    assert cli("exec", "2", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    # re-rate in place, then down twice
    assert "link rate 1gbit -> none" in cli("up", "--nodes", "2", "--link", "none").stdout
    assert all("tbf" not in r["qdisc"] for r in status()["nodes"])
    bad = cli("up", "--nodes", "3", check=False)
    assert bad.returncode == 1 and "HINT" in bad.stderr and "Traceback" not in bad.stderr
    assert "cluster down" in cli("down").stdout
    assert our_netns() == set() and not state_path(STATE_DIR).exists()
    assert hosts.block(hosts.HOSTS) is None
    assert "nothing to remove" in cli("down").stdout
    assert status() == {"up": False, "state": str(state_path(STATE_DIR))}
    assert root_view() == before


def test_errors_are_one_line_with_hint(clean: list[str]) -> None:
    for args in (
        ["up", "--nodes", "2", "--link", "fast"],
        ["up", "--nodes", "0"],
        ["up", "--nodes", "2", "--subnet", "8.8.8.0/24"],
        ["mpiexec", "-n", "2", "--", "true"],  # not up
        ["exec", "node1", "--", "true"],
    ):
        proc = cli(*args, check=False)
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("mpitrain cluster: error: ") and "HINT" in proc.stderr, args
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert our_netns() == set()


def test_refuses_names_it_did_not_create(clean: list[str]) -> None:
    clean += ["mpt-node2", "mpt-node5"]
    sh("ip", "netns", "add", "mpt-node2")
    proc = cli("up", "--nodes", "2", check=False)
    assert proc.returncode == 1 and "mpt-node2 exists but was not created" in proc.stderr
    assert our_netns() == {"mpt-node2"}  # checked before creating anything
    sh("ip", "netns", "del", "mpt-node2")
    sh("ip", "netns", "add", "mpt-node5")  # same prefix, not ours, not in the way
    cli("up", "--nodes", "2")
    refused = cli("exec", "node5", "--", "true", check=False)
    assert refused.returncode == 1 and "not a node of this cluster" in refused.stderr
    agent = status()["agent"]
    a = subprocess.run([agent, "-x", "mpt-node5", "true"], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert a.returncode == 255 and "not a node of this cluster" in a.stderr
    out = cli("down").stdout
    assert "left alone (not created by this tool): mpt-node5" in out
    assert our_netns() == {"mpt-node5"}


def test_agent_takes_ssh_style_calls(clean: list[str]) -> None:
    cli("up", "--nodes", "2")
    agent = status()["agent"]
    for argv in (
        [agent, "-x", "mpt-node1", "hostname"],
        [agent, "-x", "-o", "BatchMode=yes", "-p", "22", "-q", "root@mpt-node1", "hostname"],
        [agent, "-oStrictHostKeyChecking=no", "mpt-node1", "echo", "$(hostname)"],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip() == "mpt-node1", (argv, proc.stderr)


def test_down_after_crash_removes_what_is_left(clean: list[str]) -> None:
    cli("up", "--nodes", "3", "--link", "10gbit")
    # a crash mid-way: one node gone, a link gone, the agent gone, and one object recorded
    # but never created (the tool records before it creates)
    sh("ip", "netns", "del", "mpt-node2")
    sh("ip", "-n", "mpt-head", "link", "del", "mpt-v3")
    (STATE_DIR / "agent").unlink()
    st = State.load(state_path(STATE_DIR))
    assert st is not None
    st.record(Item("netns", "mpt-node4"))
    info = status()
    assert not info["complete"]
    assert [r["present"] for r in info["nodes"]] == [True, False, False]
    proc = cli("mpiexec", "-n", "2", "--", "true", check=False)
    assert proc.returncode == 1 and "incomplete" in proc.stderr and "HINT" in proc.stderr
    # `up` repairs it...
    cli("up", "--nodes", "3", "--link", "10gbit")
    assert status()["complete"]
    assert cli("exec", "3", "--", "hostname").stdout.strip() == "mpt-node3"
    # ...and after another crash `down` removes the rest
    sh("ip", "netns", "del", "mpt-node1")
    assert "cluster down" in cli("down").stdout
    assert our_netns() == set() and hosts.block(hosts.HOSTS) is None
    assert not state_path(STATE_DIR).exists() and not (STATE_DIR / "agent").exists()


def test_down_leaves_a_recreated_namespace_alone(clean: list[str]) -> None:
    cli("up", "--nodes", "2")
    clean.append("mpt-node1")
    sh("ip", "netns", "del", "mpt-node1")
    sh("ip", "netns", "add", "mpt-node1")  # someone else's now (another inode)
    proc = cli("up", "--nodes", "2", check=False)
    assert proc.returncode == 1 and "not created by this tool" in proc.stderr
    out = cli("down").stdout
    assert "left namespace mpt-node1 alone" in out, out
    assert our_netns() == {"mpt-node1"}


def test_down_refuses_while_processes_run_unless_kill(clean: list[str]) -> None:
    cli("up", "--nodes", "1")
    sleeper = subprocess.Popen(
        ["ip", "netns", "exec", "mpt-node1", "sleep", "60"], start_new_session=True
    )
    try:
        deadline = 50
        while deadline and not sh("ip", "netns", "pids", "mpt-node1").split():
            deadline -= 1
            subprocess.run(["sleep", "0.1"], timeout=5)
        proc = cli("down", check=False)
        assert proc.returncode == 1 and "--kill" in proc.stderr, proc.stderr
        assert our_netns() == {"mpt-head", "mpt-node1"}
        assert "killed mpt-node1" in cli("down", "--kill").stdout
        assert sleeper.wait(timeout=10) != 0
    finally:
        sleeper.kill()
    assert our_netns() == set()
    assert json.loads(cli("status", "--json").stdout)["up"] is False
