"""``python -m mpitrain.bench shard`` on 2 ranks with a small MLP: every method reports, and
the sharded parts are 1/N of the replicas' (ZeRO-3 and FSDP2: all of the model state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

METHODS = ["replicas", "zero1", "zero2", "zero3", "torch-fsdp2"]


@pytest.mark.mpi
def test_bench_shard_memory_per_rank(mpiexec: str, tmp_path: Path) -> None:
    out = tmp_path / "shard.json"
    args = ["shard", "-n", "2", "--widths", "64,256,256,64", "--batch", "8", "--steps", "1",
            "--bucket-mb", "0.05", "--methods", ",".join(METHODS), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "mpitrain.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == METHODS and doc["killed"] == []
    base = rows["replicas"]
    assert rows["zero1"]["optimizer"] == pytest.approx(base["optimizer"] / 2, rel=0.05)
    assert rows["zero2"]["gradients"] == pytest.approx(base["gradients"] / 2, rel=0.05)
    for name in ("zero3", "torch-fsdp2"):
        assert rows[name]["model_state"] == pytest.approx(base["model_state"] / 2, rel=0.05)
    assert rows["zero3"]["parameters_transient_peak"] > 0  # units gathered inside the step
    assert "zero3" in proc.stdout and "of repl" in proc.stdout
