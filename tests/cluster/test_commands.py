"""Serial checks of the cluster tool's pure parts (no root, no namespaces): run everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpitrain.cluster import ClusterError, hosts, launch
from mpitrain.cluster.launch import agent_script, mpiexec_argv, openmpi_argv, placement
from mpitrain.cluster.netns import parse_rate, tbf_burst
from mpitrain.cluster.state import Item, State

NODES = ["mpt-node1", "mpt-node2", "mpt-node3"]
HEAD_PREFIX = ["ip", "netns", "exec", "mpt-head", "unshare", "--uts", "sh", "-c"]


def test_placement_fills_nodes_in_order() -> None:
    assert placement(4, 2, NODES) == [("mpt-node1", 2), ("mpt-node2", 2)]
    assert placement(5, 2, NODES) == [("mpt-node1", 2), ("mpt-node2", 2), ("mpt-node3", 1)]
    assert placement(3, None, NODES) == [(n, 1) for n in NODES]
    assert placement(4, None, NODES) == [("mpt-node1", 2), ("mpt-node2", 2)]
    with pytest.raises(ClusterError, match=r"need 4 nodes.*HINT"):
        placement(4, 1, NODES)


def test_mpich_command_line() -> None:
    argv = mpiexec_argv("/v/mpiexec", Path("/run/a"), [("mpt-node1", 2)], ["python", "x.py"])
    assert argv[: len(HEAD_PREFIX)] == HEAD_PREFIX
    hydra = argv[argv.index("/v/mpiexec") :]
    assert hydra[:13] == [
        "/v/mpiexec", "-launcher", "ssh", "-launcher-exec", "/run/a", "-iface", "mpt0",
        "-hosts", "mpt-node1:2", "-n", "2", "-genvall", "-genv",
    ]  # fmt: skip
    joined = " ".join(hydra)
    assert "-genv MPIR_CVAR_CH4_NETMOD ofi -genv FI_PROVIDER tcp -genv FI_TCP_IFACE mpt0" in joined
    assert hydra[-2:] == ["python", "x.py"]
    ucx = " ".join(mpiexec_argv("m", Path("a"), [("n", 1)], ["c"], netmod="ucx"))
    assert "-genv UCX_TLS tcp -genv UCX_NET_DEVICES mpt0" in ucx
    shm = mpiexec_argv("m", Path("a"), [("n", 1)], ["c"], netmod="shm")
    assert not any(a.startswith(("UCX_", "FI_", "MPIR_")) for a in shm)


def test_openmpi_command_line() -> None:
    argv = openmpi_argv("/o/mpirun", Path("/run/a"), [("mpt-node1", 1), ("mpt-node2", 1)], ["c"])
    joined = " ".join(argv)
    assert "env SHELL=/bin/sh /o/mpirun --prtemca plm_ssh_agent /run/a" in joined
    assert "--host mpt-node1:1,mpt-node2:1 -n 2" in joined and argv[-1] == "c"


def test_openmpi_ulfm_command_line() -> None:
    slots = [("mpt-node1", 2), ("mpt-node2", 2)]
    joined = " ".join(openmpi_argv("/o/mpirun", Path("/run/a"), slots, ["c"], ulfm=True))
    assert ("/o/mpirun --with-ft ulfm --mca pml ob1 --mca btl tcp,sm,self --mca "
            "async_mpi_finalize 1 --prtemca oob_tcp_keepalive_time 2") in joined
    # traffic and the runtime stay on the emulated network
    assert "--prtemca oob_tcp_if_include mpt0 --mca btl_tcp_if_include mpt0" in joined
    assert "--host mpt-node1:2,mpt-node2:2 -n 4" in joined
    assert "--with-ft" not in " ".join(openmpi_argv("/o/mpirun", Path("/run/a"), slots, ["c"]))


def test_ulfm_mpirun_prefers_an_open_mpi_mpiexec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ompi, hydra = tmp_path / "mpirun", tmp_path / "mpiexec"
    ompi.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 5.0.11'\n")
    hydra.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    for f in (ompi, hydra):
        f.chmod(0o755)
    monkeypatch.setattr(launch, "find_ulfm_mpirun", lambda: "/venv/openmpi/bin/mpirun")
    assert launch.ulfm_mpirun(str(ompi)) == str(ompi)
    assert launch.ulfm_mpirun(str(hydra)) == "/venv/openmpi/bin/mpirun"
    assert launch.ulfm_mpirun(None) == "/venv/openmpi/bin/mpirun"
    monkeypatch.setattr(launch, "find_ulfm_mpirun", lambda: None)
    with pytest.raises(ClusterError, match=r"--ulfm needs Open MPI's mpirun.*HINT: make setup"):
        launch.ulfm_mpirun(str(hydra))


def test_agent_lists_only_the_nodes() -> None:
    text = agent_script(NODES[:2])
    assert 'NODES=" mpt-node1 mpt-node2 "' in text
    assert 'exec ip netns exec "$host" unshare --uts' in text


def test_rates() -> None:
    assert parse_rate("1gbit") == 10**9 and parse_rate("2.5Gbit") == 2_500_000_000
    assert parse_rate("100mbit") == 10**8 and parse_rate("none") is None
    for bad in ("fast", "1gbps", "0gbit", "-1mbit"):
        with pytest.raises(ClusterError, match="HINT"):
            parse_rate(bad)
    assert tbf_burst(10**9) == 250_000 and tbf_burst(10**6) == 64 << 10


def test_hosts_block_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("127.0.0.1 localhost\n10.0.0.9 other mpt-node7 # theirs\n")
    hosts.write_block(f, [("10.213.0.1", "mpt-node1")])
    hosts.write_block(f, [("10.213.0.1", "mpt-node1"), ("10.213.0.2", "mpt-node2")])
    assert hosts.block(f) == ["10.213.0.1 mpt-node1", "10.213.0.2 mpt-node2"]
    assert f.read_text().count(hosts.BEGIN) == 1
    assert hosts.foreign(f, ["mpt-node1", "mpt-node7"]) == ["10.0.0.9 other mpt-node7 # theirs"]
    assert hosts.remove_block(f) and not hosts.remove_block(f)
    assert f.read_text() == "127.0.0.1 localhost\n10.0.0.9 other mpt-node7 # theirs\n"


def test_state_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert State.load(path) is None
    st = State(path, ["mpt-node1"], "10.213.0.0/24", "1gbit")
    st.record(Item("netns", "mpt-head", inode=7))
    got = State.load(path)
    assert got is not None and got.find("netns", "mpt-head") == Item("netns", "mpt-head", inode=7)
    assert got.find("netns", "mpt-node1") is None
    path.write_text("{broken")
    with pytest.raises(ClusterError, match=r"state\.json' is not valid JSON.*HINT"):
        State.load(path)
