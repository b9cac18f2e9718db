"""``python -m mpitrain.bench cluster``: a benchmark run on an emulated cluster it brings up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.cluster.state import STATE_DIR, state_path
from tests.cluster.conftest import PY, run

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]


def test_bench_cluster_runs_the_benchmark_across_the_nodes(
    cluster_ok: None, tmp_path: Path
) -> None:
    proc = run([PY, "-m", "mpitrain.bench", "cluster", "--topologies", "2x1", "--links", "none",
                "--out", str(tmp_path), "--", "allreduce", "--max-bytes", "1048576",
                "--reps", "1", "--loop-mb", "4"], timeout=240)
    assert "allreduce on 2 node(s) x 1 rank(s), link none" in proc.stdout, proc.stdout
    data = json.loads((tmp_path / "allreduce_2x1_none.json").read_text())
    point = data["cluster"]
    assert (point["nodes"], point["per_node"], point["link"]) == (2, 1, "none")
    # every node put at least the timed loops' 4 MiB per size on its link
    assert len(point["bytes_sent"]) == 2 and min(point["bytes_sent"].values()) > 4 << 20, point
    assert data["rows"], data
    assert not state_path(STATE_DIR).exists(), "the driver must take its cluster down"


def test_bench_cluster_refuses_a_bad_topology() -> None:
    proc = run([PY, "-m", "mpitrain.bench", "cluster", "--topologies", "2by2", "--", "train"],
               check=False)
    assert proc.returncode != 0
    assert "topology '2by2' is not NODESxRANKS" in proc.stderr, proc.stderr
