"""Multi-rank tests of ZeRO sharding (scenarios in tests/mpi/scenarios/zero_*.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MpiRun

CHECKS = {
    "uneven sizes, many buckets",
    "one bucket",
    "clipping",
    "no_sync accumulation",
    "unused branch",
    "deep branch skipped on one rank",
    "branch used in an early micro-batch only",
    "batchnorm buffers",
    "bf16 compression",
    "memory accounting",
    "mixed precision: bf16 compute, float32 master shards",
    "second backward without no_sync raises",
}


def _passed(stdout: str) -> set[str]:
    return {line[5:].rsplit(" (n=", 1)[0] for line in stdout.splitlines()
            if line.startswith("PASS ")}


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_stages_equal_data_parallel(mpirun: MpiRun, n: int) -> None:
    proc = mpirun(n, ["zero_equivalence.py"], timeout=150)
    assert _passed(proc.stdout) == CHECKS, proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize(("n", "m"), [(4, 2), (2, 3)])
def test_sharded_checkpoint_reshards(mpirun: MpiRun, tmp_path: Path, n: int, m: int) -> None:
    proc = mpirun(n, ["zero_checkpoint.py", "save", str(tmp_path)], timeout=60)
    assert _passed(proc.stdout) == {"save"}, proc.stdout
    proc = mpirun(m, ["zero_checkpoint.py", "resume", str(tmp_path)], timeout=90)
    assert _passed(proc.stdout) == {
        "consolidate equals the unsharded model",
        "resume re-shards and continues like an unsharded run",
        "damaged or unfinished checkpoint is refused",
    }, proc.stdout
    # the command line writes the same plain state_dict
    out = tmp_path / "cli.pt"
    cli = subprocess.run(
        [sys.executable, "-m", "mpitrain", "checkpoint", "consolidate",
         str(tmp_path / "ckpt"), str(out)], capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "wrote" in cli.stdout
    import torch

    got = torch.load(out, weights_only=True)
    want = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.mpi
def test_trainer_shard_trains_like_sync(mpirun: MpiRun, tmp_path: Path) -> None:
    """--shard optimizer/gradients/parameters (with clipping) == --shard none in the trainer."""
    import json

    summaries = {}
    trace = tmp_path / "zero3-trace.json"
    for shard in ("none", "gradients", "parameters"):
        out = tmp_path / f"{shard}.json"
        timeline = ["--timeline", str(trace), "--timeline-steps", "2:6"] * (shard == "parameters")
        mpirun(2, ["-m", "mpitrain", "--shard", shard, "--epochs", "2", "--no-progress",
                   "--clip-grad-norm", "0.5", "--summary-json", str(out), *timeline],
               timeout=150)
        summaries[shard] = json.loads(out.read_text())
    # --timeline records ZeRO-3's collectives: communication > 0 in every step, by name
    from mpitrain.timeline.summary import load, problems, summarize

    doc = load(trace)
    assert problems(doc) == []
    s = summarize(doc)
    assert [r.step for r in s.steps] == [2, 3, 4, 5] and all(r.comm > 0 for r in s.steps)
    assert 0 < s.comm_ms and 0 <= s.exposed_ms <= s.comm_ms and s.hidden_frac is not None
    kinds = {c.name.split(" b")[0] for c in s.collectives}
    assert kinds == {"reduce-scatter", "all-gather", "allreduce grad norm"}, s.collectives
    buckets = {c.name.split(" b")[1] for c in s.collectives if " b" in c.name}
    assert {f"reduce-scatter b{b}" for b in buckets} | {f"all-gather b{b}" for b in buckets} \
        <= {c.name for c in s.collectives}
    assert all(c.flights >= 8 and c.bytes > 0 for c in s.collectives), s.collectives
    want = summaries["none"]
    for shard in ("gradients", "parameters"):
        got = summaries[shard]
        assert got["world_size"] == 2
        assert float(got["test_accuracy"]) == pytest.approx(float(want["test_accuracy"]),
                                                            abs=1e-3)
        assert float(got["final_loss"]) == pytest.approx(float(want["final_loss"]), rel=1e-4)
        assert float(got["test_accuracy"]) >= 0.8, got
    # bf16 autocast: the sharded parameters are float32 masters, autocast casts per op
    bf16 = {}
    for shard in ("none", "parameters"):
        out = tmp_path / f"bf16-{shard}.json"
        mpirun(2, ["-m", "mpitrain", "--shard", shard, "--epochs", "2", "--no-progress",
                   "--precision", "bf16", "--summary-json", str(out)], timeout=150)
        bf16[shard] = json.loads(out.read_text())
    assert float(bf16["parameters"]["final_loss"]) == pytest.approx(
        float(bf16["none"]["final_loss"]), rel=1e-4)


@pytest.mark.mpi
@pytest.mark.parametrize("shard", ["gradients", "parameters"])
def test_trainer_sharded_checkpoints_resume_bitwise(
    mpirun: MpiRun, tmp_path: Path, shard: str
) -> None:
    """--shard with --checkpoint-dir: shards beside the file; resume == uninterrupted, bitwise;
    pruning takes the shard directories with their files; 2 -> 3 ranks re-shards."""
    import shutil

    import torch

    from mpitrain.checkpoint.shards import load_full

    common = ["-m", "mpitrain", "--shard", shard, "--max-steps", "40", "--no-progress",
              "--checkpoint-every", "10", "--keep-last", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    mpirun(2, [*common, "--checkpoint-dir", str(a)], timeout=150)
    shards = sorted(p.name for p in a.glob("*.shards"))
    assert len(shards) == 2 and shards[-1].startswith("ckpt-step-00000040-"), shards
    assert sorted(p.name for p in a.glob("step-*.pt")) == ["step-000000030.pt",
                                                           "step-000000040.pt"]
    b.mkdir()
    for name in ("step-000000030.pt", "step-000000030.pt.sha256", shards[0]):
        src = a / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, b / name)
    proc = mpirun(2, [*common, "--checkpoint-dir", str(b), "--resume", "auto"], timeout=150)
    assert "resumed from" in proc.stdout
    got = load_full(sorted(b.glob("*.shards"))[-1])
    want = load_full(a / shards[-1])
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for name, st in want["optim_state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(got["optim_state"][name][key]),
                               torch.as_tensor(v)), (name, key)
    # another rank count re-shards the same state and goes on
    more = mpirun(3, [*common[:5], "60", "--no-progress", "--checkpoint-every", "10",
                      "--checkpoint-dir", str(b), "--resume", "auto"], timeout=150)
    assert "saved by 2 ranks, now 3" in more.stdout, more.stdout
    # a replicated run cannot take a sharded checkpoint (and says how)
    bad = mpirun(2, ["-m", "mpitrain", "--max-steps", "70", "--no-progress",
                     "--checkpoint-dir", str(b), "--resume", "auto"], timeout=150, check=False)
    assert bad.returncode != 0 and "saved with --shard" in bad.stdout + bad.stderr


@pytest.mark.mpi
def test_shard_transports(mpirun: MpiRun) -> None:
    """Hierarchical (block and round-robin placements) and staged reduce-scatter / all-gather
    == flat; stages 1-3 over them == sync DataParallel; fp16 loss scaling agreed over shards."""
    proc = mpirun(4, ["zero_transports.py"], timeout=240)
    assert _passed(proc.stdout) == {
        "transports == flat, 2x2 block",
        "transports == flat, 2x2 round-robin",
        "transports == flat, 4x1",
        "transports == flat, 1x4",
        "stages 1-3 over hierarchical and staged transports == sync data parallel",
        "bf16 compression over the hierarchical reduce-scatter",
        "stages 1-3 with the collectives on communication threads == main thread",
        "fp16 loss scaler: an overflow in one rank's shard skips every rank's step",
    }, proc.stdout


@pytest.mark.mpi
def test_trainer_shard_hierarchical(mpirun: MpiRun, tmp_path: Path) -> None:
    """--shard parameters --allreduce hierarchical on 2 x 2 pretend nodes == --shard none."""
    import json

    got = {}
    for shard in ("none", "parameters"):
        out = tmp_path / f"{shard}.json"
        proc = mpirun(4, ["-m", "mpitrain", "--shard", shard, "--allreduce", "hierarchical",
                          "--max-steps", "60", "--no-progress", "--summary-json", str(out)],
                      timeout=150, extra_env={"MPITRAIN_RANKS_PER_NODE": "2"})
        got[shard] = json.loads(out.read_text())
        if shard == "parameters":
            assert "shard transport: HierarchicalShards" in proc.stdout + proc.stderr
    assert float(got["parameters"]["final_loss"]) == pytest.approx(
        float(got["none"]["final_loss"]), rel=1e-4)
    assert float(got["parameters"]["test_accuracy"]) == pytest.approx(
        float(got["none"]["test_accuracy"]), abs=2e-3)
