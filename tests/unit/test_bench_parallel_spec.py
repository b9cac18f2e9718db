"""``bench parallel`` beyond the built-in GPT, serially: the torch-stack copy of a Hugging Face
spec's stage (mpitrain's one-rank layers back to ``nn.Linear`` / ``nn.Embedding``, GPT-2's
tied head kept tied) computes what the stage does; the kernel's OOM-kill count is read from a
cgroup's files; a method killed over the memory budget is a row of the table, and the
targets are judged from the rows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpitrain.bench.budget import oom_kills
from mpitrain.bench.parallel_dtensor_spec import torch_layers
from mpitrain.bench.parallel_report import report, targets
from mpitrain.bench.parallel_torch import logits_module
from mpitrain.config import TrainConfig
from mpitrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

pytest.importorskip("transformers")


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_torch_layers_compute_what_the_stage_does(model: str) -> None:
    from mpitrain.train.models import MODELS

    spec = MODELS[model](TrainConfig(model=model, hidden=32, heads=4, layers=2, context=8))
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, 256, (2, 8), generator=g) for _ in range(2))
    ref = spec.build_stage(MPI.COMM_SELF, 0, 1, torch.device("cpu"))(x, y)
    stage = spec.build_stage(MPI.COMM_SELF, 0, 1, torch.device("cpu"))
    torch_layers(stage, 1)
    kinds = {type(m) for m in stage.modules()}
    assert nn.Linear in kinds and nn.Embedding in kinds
    assert not kinds & {ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding}
    if model == "gpt2":  # the tied head is the embedding's parameter again
        assert stage.get_parameter("lm_head.weight") is \
            stage.get_parameter("transformer.wte.weight")
    logits = logits_module(stage)(x)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_oom_kills_reads_the_kernels_count(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert (oom_kills(v1), oom_kills(v2), oom_kills(tmp_path / "gone")) == (2, 1, 0)


def _row(method: str, impl: str, t: int, p: int, d: int, step: float, **kw: object) -> dict:
    mib = 2**20
    return {"method": method, "implementation": impl, "tensor": t, "pipeline": p, "data": d,
            "virtual_stages": 1, "shard": 0, "schedule": "1f1b" if p > 1 else None,
            "numel": mib, "parameters": 4 * mib // (t * p), "gradients": 4 * mib // (t * p),
            "optimizer": 8 * mib // (t * p), "model_state": 16 * mib // (t * p),
            "activations_peak": mib, "peak_rss": 300 * mib, "step_ms": step,
            "tokens_per_s": 1.0, "bubble_measured": None, "bubble_theory": None, "loss": 5.5,
            **kw}


def test_report_prints_a_killed_method_and_judges_the_targets(
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"method": "dp", "model": "llama", "ranks": 4, "tensor": 1, "pipeline": 1,
             "data": 4, "killed": True, "oom_kills": 4, "exit": 9, "budget_mb": 200.0},
            _row("tp2-pp2", "mpitrain", 2, 2, 1, 90.0, cgroup_peak=150 * 2**20),
            _row("torch-tp2-pp2", "torch (DTensor, FSDP2, pipelining)", 2, 2, 1, 100.0),
            _row("pp2-interleaved", "mpitrain", 1, 2, 2, 120.0, virtual_stages=2,
                 schedule="interleaved", bubble_measured=0.2, bubble_theory=1 / 17)]
    a = argparse.Namespace(model="llama", dim=768, layers=4, heads=4, context=32, batch=8,
                           micro_batches=8, virtual_stages=2, ranks=4, placement="inside",
                           memory_budget_mb=200.0)
    report(rows, a)
    text = capsys.readouterr().out
    assert "KILLED by the kernel: 4 OOM kill(s) over the 200 MiB per-rank budget" in text
    assert "per-rank budget 200 MiB" in text and "charged" in text
    lines = targets(rows)
    assert any(x.startswith("state     tp2-pp2") and x.endswith("<= 0.350: met") for x in lines)
    assert any("pp2-interleaved" in x and "MISSED" in x for x in lines if "bubble" in x)
    assert any(x.startswith("step      tp2-pp2") and "= 0.90: met" in x for x in lines)
