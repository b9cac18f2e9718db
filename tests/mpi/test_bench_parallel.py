"""``python -m mpitrain.bench parallel`` on 2 ranks with a tiny GPT: every method reports, the
split methods hold about half of data parallel's parameters, ZeRO-1 half its optimizer state
and ZeRO-3 half its model state, GPipe keeps more activations alive than 1F1B and the
theoretical bubble is (P - 1) / (m + P - 1)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mpitrain.parallel.schedule import bubble_theory
from tests.conftest import ROOT

METHODS = ["dp", "tp2", "pp2-1f1b", "pp2-gpipe", "zero1", "zero3"]


@pytest.mark.mpi
def test_bench_parallel_memory_and_bubble(mpiexec: str, tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    args = ["parallel", "-n", "2", "--dim", "64", "--layers", "4", "--heads", "4",
            "--context", "16", "--batch", "8", "--micro-batches", "4", "--steps", "2",
            "--methods", ",".join(METHODS), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "mpitrain.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == METHODS
    assert "grid tensor 2 x pipeline 1 x data 1" in proc.stdout  # describe() is printed
    dp = rows["dp"]
    assert (dp["tensor"], dp["pipeline"], dp["data"]) == (1, 1, 2)
    for name in ("tp2", "pp2-1f1b", "pp2-gpipe"):
        ratio = rows[name]["parameters"] / dp["parameters"]
        assert ratio == pytest.approx(0.5, rel=0.2), (name, ratio)
        assert rows[name]["model_state"] == pytest.approx(dp["model_state"] / 2, rel=0.2)
    assert rows["pp2-gpipe"]["activations_peak"] >= rows["pp2-1f1b"]["activations_peak"] > 0
    for name in ("pp2-1f1b", "pp2-gpipe"):
        assert rows[name]["bubble_theory"] == pytest.approx(bubble_theory(2, 4)) == 0.2
        assert 0.0 <= rows[name]["bubble_measured"] < 1.0
    assert dp["bubble_theory"] is None and rows["tp2"]["bubble_measured"] is None
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    # ZeRO over the 2 replicas: the optimizer state halves (stage 1), all model state (stage 3)
    assert rows["zero1"]["optimizer"] == pytest.approx(dp["optimizer"] / 2, rel=0.1)
    assert rows["zero3"]["model_state"] == pytest.approx(dp["model_state"] / 2, rel=0.2)


@pytest.mark.mpi
def test_bench_parallel_torch_stack_trains_like_data_parallel(mpiexec: str,
                                                              tmp_path: Path) -> None:
    """torch's own stack on 4 ranks (DTensor tensor 2 x replicate 2; x FSDP2 2; x torch
    pipelining 2 with FSDP2 and the tied embedding summed over the stages) trains the same GPT
    as data parallel: the same losses over 3 AdamW steps; 1/2, 1/4, 1/4 of its model state."""
    out = tmp_path / "torch.json"
    share = {"torch-tp2": 0.5, "torch-tp2-fsdp2": 0.25, "torch-tp2-pp2-fsdp2": 0.25}
    args = ["parallel", "-n", "4", "--dim", "64", "--layers", "2", "--heads", "4",
            "--context", "16", "--batch", "8", "--micro-batches", "2", "--steps", "1",
            "--methods", ",".join(["dp", *share]), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "mpitrain.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert "data 2 (FSDP2 fully_shard) x tensor 2 (DTensor" in proc.stdout
    dp = rows["dp"]
    for name, part in share.items():
        r = rows[name]
        assert r["implementation"].startswith("torch") and len(r["losses"]) == 3
        assert r["losses"] == pytest.approx(dp["losses"], rel=1e-5), name
        assert r["model_state"] == pytest.approx(dp["model_state"] * part, rel=0.25), name


@pytest.mark.mpi
def test_bench_parallel_llama_interleaved_columns_and_bubble(mpiexec: str,
                                                            tmp_path: Path) -> None:
    """``--model llama``: the Hugging Face Llama spec's stages built from the registry, 2 chunks
    per rank on 2 ranks (interleaved 1F1B): every column a real number, half a replica's
    model state per rank, the bubble measured beside (P - 1) / (v m + P - 1) = 1/9, and the
    target lines printed."""
    out = tmp_path / "llama.json"
    args = ["parallel", "-n", "2", "--model", "llama", "--dim", "64", "--layers", "4",
            "--heads", "4", "--context", "16", "--batch", "8", "--micro-batches", "4",
            "--steps", "1", "--methods", "pp2-interleaved", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "mpitrain.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["rows"]
    assert (r["model"], r["virtual_stages"], r["pipeline"], r["data"]) == ("llama", 2, 2, 1)
    for key in ("parameters", "gradients", "optimizer", "model_state", "activations_peak",
                "peak_rss", "step_ms", "tokens_per_s", "loss", "bubble_measured"):
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["bubble_theory"] == pytest.approx(bubble_theory(2, 4, 2)) == pytest.approx(1 / 9)
    assert r["bubble_measured"] < 1.0
    assert r["model_state"] == pytest.approx(r["numel"] * 16 / 2, rel=0.1)  # half a replica
    assert r["loss"] == pytest.approx(math.log(256), rel=0.05)  # random tokens, fresh model
    assert "bubble    pp2-interleaved" in proc.stdout and "vs theory 0.111" in proc.stdout
