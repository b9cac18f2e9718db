"""Hierarchical, staged and CUDA-aware reducers, the CUDA-aware decision and device binding
across 4 ranks as pretend nodes (one mpiexec launch; checks in scenarios/device_reducers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, MpiRun

EXPECTED = [
    "hierarchical == flat for 4 ranks as 2x2",
    "hierarchical == flat for 4 ranks as 4x1",
    "hierarchical == flat for 4 ranks as 1x4",
    "hierarchical == flat on uneven nodes (3 + 1), pipelined",
    "staged (CPU, forced) == direct bitwise; buffers allocated once and reused",
    "staged over hierarchical == hierarchical bitwise",
    "CUDA-aware reducer code path on CPU == flat bitwise",
    "make_reducer stacks",
    "engine + hooks (none, bf16, fp16-ef) on staged == flat bitwise",
    "decide_cuda_aware agrees on every rank",
    "bind_device: one GPU per local rank",
]


@pytest.mark.mpi
def test_device_reducers_4_ranks(mpirun: MpiRun) -> None:
    proc = mpirun(
        4, ["device_reducers.py"], timeout=120, extra_env={"MPITRAIN_RANKS_PER_NODE": "2"}
    )
    ok = [line[3:] for line in proc.stdout.splitlines() if line.startswith("OK ")]
    for want in EXPECTED:
        assert any(line.startswith(want) for line in ok), (want, proc.stdout)


@pytest.mark.mpi
def test_bench_algo_smoke(mpiexec: str, tmp_path: Path) -> None:
    out = tmp_path / "algo.json"
    # the documented entry: `bench allreduce --algo ...` hands over to `bench algo`
    cmd = [sys.executable, "-m", "mpitrain.bench", "allreduce", "--algo", "flat,hierarchical"]
    cmd += ["--sizes", "4K,100K", "--reps", "1"]
    cmd += ["--iters", "2", "--path", "host,staged", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["ranks"] == 4 and data["meta"]["nodes"] == 2
    got = {(r["bytes"], r["algo"], r["path"]) for r in data["rows"]}
    algos = ("flat", "hier[reduce_bcast]", "hier[rs_ag]")
    assert got == {(b, a, p) for b in (4096, 102400) for a in algos for p in ("host", "staged")}
    assert all(r["us"] > 0 for r in data["rows"])
    assert "fastest" in proc.stdout.splitlines()[1]


def test_bench_dispatch_table() -> None:
    """Every benchmark named in the dispatcher imports and has main(); docs' names exist."""
    import importlib

    from mpitrain.bench.__main__ import BENCHMARKS

    assert {"allreduce", "train", "loader", "algo", "async"} <= set(BENCHMARKS)
    for module, _ in BENCHMARKS.values():
        assert callable(importlib.import_module(module).main), module


def test_parse_size() -> None:
    from mpitrain.bench.algo import human, parse_size

    assert [parse_size(s) for s in ("4K", "64KiB", "1M", "1000", "2G")] == [
        4096,
        65536,
        1 << 20,
        1000,
        2 << 30,
    ]
    assert [human(n) for n in (4096, 1 << 20, 1000)] == ["4K", "1M", "1000"]
