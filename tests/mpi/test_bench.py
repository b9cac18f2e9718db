"""Smoke runs of the benchmarks' command lines (tiny sizes): each launches its own mpiexec,
prints its table and writes JSON whose rows hold what docs/benchmarks.md reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _bench(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mpitrain.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.mpi
def test_bench_train_smoke(mpiexec: str, tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    proc = _bench(["train", "--models", "mlp", "--rounds", "1", "--scale", "0.1",
                   "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["single", "nocomm", "mpitrain", "ddp"]
    assert all(r["step_ms"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["efficiency"] == pytest.approx(1.0) and rows[1]["vs_nocomm"] == 1.0
    assert "of nocomm" in proc.stdout


@pytest.mark.mpi
def test_bench_allreduce_smoke(mpiexec: str, tmp_path: Path) -> None:
    out = tmp_path / "ar.json"
    _bench(["allreduce", "--max-bytes", "65536", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["bytes"] for r in rows][-1] == 65536
    for r in rows:
        assert all(r[f"{m}_us"] > 0 for m in ("raw", "mpitrain", "mpitrain_async", "gloo"))


@pytest.mark.mpi
def test_bench_ps_transport_smoke(mpiexec: str, tmp_path: Path) -> None:
    """Both parameter-server transports run and deliver the workers' average (checked inside)."""
    out = tmp_path / "pst.json"
    _bench(["ps-transport", "--workers", "1,2", "--sizes", "4K,64K", "--rounds", "3",
            "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["protocol"], r["workers"], r["bytes"]) for r in rows}
    assert got == {(p, w, b) for p in ("p2p", "rma") for w in (1, 2) for b in (4096, 65536)}
    assert all(r["round_us"] > 0 for r in rows)


@pytest.mark.mpi
def test_bench_half_smoke(mpiexec: str, tmp_path: Path) -> None:
    """Both half-precision sum designs run; their results stay within a few ulps of exact."""
    out = tmp_path / "half.json"
    _bench(["half", "--sizes", "4K", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    for r in rows:
        assert r["op_us"] > 0 and r["gather_us"] > 0
        assert r["op_max_err_eps"] <= 8 and r["gather_max_err_eps"] <= 8  # 2 ranks: one rounding
