"""--timeline of a tensor 2 x pipeline 2 grid: the tensor-parallel collectives, the pipeline's
sends and receives and the bubble as spans on every rank, and ``trace summary``'s per-stage
table (mpitrain/timeline/stages.py)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mpitrain.timeline.summary import format_summary, load, problems, summarize
from tests.conftest import MpiRun

BATCH, MICRO, CONTEXT, HIDDEN, LAYERS = 8, 2, 32, 32, 2
GPT = ["-m", "mpitrain", "--model", "gpt", "--context", str(CONTEXT), "--hidden", str(HIDDEN),
       "--heads", "4", "--layers", str(LAYERS), "--optimizer", "sgd", "--lr", "0.1",
       "--no-scale-lr", "--warmup-epochs", "0", "--prefetch", "1", "--no-progress",
       "--batch-size", str(BATCH), "--micro-batches", str(MICRO)]
STEPS = (2, 3, 4, 5)
#: one micro-batch's activation (and its gradient): micro-batch x context x hidden, float32
ACT_BYTES = BATCH // MICRO * CONTEXT * HIDDEN * 4


def expected_tp(stage: int) -> Counter[str]:
    """The tensor-parallel collectives one step issues on a stage of the built-in GPT (no
    sequence parallelism), per micro-batch: each block's row layers all-reduce forward (2) and
    its column layers' inputs backward (2); the first stage's vocabulary-parallel embedding
    all-reduces forward; the last stage's head input all-reduces backward and its
    vocabulary-parallel loss all-reduces the max and the sums forward."""
    blocks = LAYERS // 2
    per_micro = Counter({"tp all-reduce fwd": 2 * blocks, "tp all-reduce bwd": 2 * blocks})
    if stage == 0:
        per_micro["tp all-reduce fwd"] += 1
    else:
        per_micro.update({"tp all-reduce bwd": 1, "tp all-reduce loss max": 1,
                          "tp all-reduce loss sums": 1})
    return Counter({k: MICRO * v for k, v in per_micro.items()})


@pytest.mark.mpi
def test_grid_timeline_records_tensor_parallel_and_pipeline_traffic(
    mpirun: MpiRun, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.json"
    mpirun(4, [*GPT, "--tensor-parallel", "2", "--pipeline-stages", "2", "--max-steps", "8",
               "--timeline", str(trace), "--timeline-steps", "2:6"], timeout=240)
    doc = load(trace)
    assert problems(doc) == [], problems(doc)[:5]
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    stage_of = {e["pid"]: e["args"]["stage"] for e in spans if e["cat"] == "bubble"}
    assert sorted(stage_of.values()) == [0, 0, 1, 1], stage_of
    for rank, stage in stage_of.items():
        for step in STEPS:
            mine = [e for e in spans if e["pid"] == rank and e["args"]["step"] == step]
            comm = [e for e in mine if e["cat"] == "comm"]
            # every tensor-parallel collective of the step's forwards and backwards, once
            tp = [e for e in comm if e["args"].get("group") == "tensor"]
            assert Counter(e["name"] for e in tp) == expected_tp(stage), (rank, step)
            for e in tp:
                assert e["args"]["op"] == "allreduce" and e["args"]["ranks"] == 2, e
                want = {"tp all-reduce loss max": ACT_BYTES // HIDDEN,
                        "tp all-reduce loss sums": 2 * ACT_BYTES // HIDDEN}
                assert e["args"]["bytes"] == want.get(e["name"], ACT_BYTES), e
            # the stage's sends and receives: one activation forward and one gradient back
            # per micro-batch, each a micro-batch's activation
            p2p = [e for e in comm if e["args"]["op"] in ("send", "recv")]
            other = 1 - stage
            names = (["send activation to stage 1", "recv gradient from stage 1"] if stage == 0
                     else ["recv activation from stage 0", "send gradient to stage 0"])
            assert Counter(e["name"] for e in p2p) == Counter(
                {n: MICRO for n in names}), (rank, step, [e["name"] for e in p2p])
            for e in p2p:
                assert e["args"]["bytes"] == ACT_BYTES, e
                assert (e["args"]["group"], e["args"]["peer"], e["args"]["stage"]) == (
                    "pipeline", other, stage), e
            assert sum(e["cat"] == "bubble" for e in mine) == MICRO, (rank, step)
            assert any(e["name"] == "broadcast loss" for e in comm), (rank, step)
    s = summarize(doc)
    assert [r.stage for r in s.stages] == [0, 1]
    for row in s.stages:
        assert row.samples == 2 * len(STEPS)  # two tensor ranks per stage, four steps
        assert row.tensor_ms > 0 and 0 < row.tensor_share < 1, row
        assert row.p2p_ms > 0 and 0 < row.p2p_share < 1, row
        assert row.p2p_bytes == 2 * MICRO * ACT_BYTES, row
    assert not any("tensor-parallel" in n for n in s.notes), s.notes
    cli = subprocess.run([sys.executable, "-m", "mpitrain", "trace", "summary", str(trace)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stderr == "", cli.stderr
    lines = cli.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "tensor-parallel ms" in line)
    assert lines[head].split() == ["stage", "rank-steps", "bubble", "%", "worst", "%",
                                   "tensor-parallel", "ms", "%", "send/recv", "ms", "%",
                                   "send/recv", "bytes"], lines[head]
    for stage, line in enumerate(lines[head + 1 : head + 3]):
        cells = line.split()
        assert cells[:2] == [str(stage), "8"] and cells[-1] == str(2 * MICRO * ACT_BYTES), line
    assert "tp all-reduce fwd" in cli.stdout and "send activation to stage 1" in cli.stdout
    assert format_summary(s).splitlines()[head:head + 3] == lines[head:head + 3]
