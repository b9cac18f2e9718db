"""The trainer end to end under mpiexec: accuracy, failures, bad input, checkpoints, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mpitrain import checkpoint as ckpt

pytestmark = pytest.mark.mpi

MODELS = "tests.mpi.scenarios.train_models"
FAST = ["--epochs", "3", "--no-progress"]


def _summary(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_demo_two_ranks_reaches_95_percent(mpirun, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = mpirun(
        2, ["-m", "mpitrain", "--summary-json", str(out), "--run-dir", str(tmp_path / "run")]
    )
    s = _summary(out)
    assert s["world_size"] == 2
    assert float(s["test_accuracy"]) >= 0.95, proc.stdout
    assert set(s) >= {
        "world_size",
        "epochs",
        "final_loss",
        "test_accuracy",
        "samples_per_sec",
        "wall_seconds",
    }
    epoch_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert len(epoch_lines) == s["epochs"] and "samples/s" in epoch_lines[0]
    assert "mpitrain: done: 2 ranks" in proc.stdout
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(m).get("kind") == "eval" for m in metrics)


def test_bf16_demo_reaches_95_percent(mpirun, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    mpirun(
        2, ["-m", "mpitrain", "--precision", "bf16", "--no-progress", "--summary-json", str(out)]
    )
    assert float(_summary(out)["test_accuracy"]) >= 0.95


def test_exception_on_rank1_aborts_job_fast(mpirun) -> None:
    t0 = time.monotonic()
    proc = mpirun(
        2, ["-m", "mpitrain", "--model", f"{MODELS}:raises", *FAST], timeout=60, check=False
    )
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 15 + 10  # 15 s budget after start-up (torch import)
    err = proc.stderr
    assert "rank 1/2" in err and "injected failure on rank 1" in err and "Traceback" in err


def test_config_errors_exit_2(mpirun, tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("epoch = 3\n")
    for args, needle in [
        (["--config", str(bad)], "unknown option 'epoch'"),
        (["--epochs", "many"], "expected int"),
        (["--precision", "fp16"], "fp16 needs a CUDA device"),
    ]:
        proc = mpirun(2, ["-m", "mpitrain", *args], timeout=60, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "HINT" in proc.stderr

    import h5py

    if not h5py.get_config().mpi:  # the PyPI h5py: the MPI-IO driver is refused on every rank
        proc = mpirun(2, ["-m", "mpitrain", "--hdf5-driver", "mpio", "--max-steps", "1"],
                      timeout=60, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "this h5py has no MPI support" in proc.stderr, proc.stderr
        assert "HDF5_MPI=ON" in proc.stderr


def test_bad_data_dirs_fail_on_every_rank(mpirun, tmp_path: Path) -> None:
    import h5py
    import numpy as np

    from mpitrain.data.writer import write_dataset

    missing = tmp_path / "nope"
    notjson = tmp_path / "notjson"
    notjson.mkdir()
    (notjson / "manifest.json").write_text("{not json")
    nox = tmp_path / "nox"
    rng = np.random.default_rng(0)
    write_dataset(
        nox,
        {"x": rng.random((40, 64), dtype=np.float32), "y": rng.integers(0, 10, 40)},
        name="bad",
        samples_per_shard=20,
    )
    shard = sorted(nox.glob("*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        del f["x"]
    for path, needle in [(missing, "nope"), (notjson, "manifest.json"), (nox, shard.name)]:
        proc = mpirun(
            2,
            ["-m", "mpitrain", "--data", str(path), "--test-split", "", *FAST],
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0, path
        assert needle in proc.stderr and "HINT" in proc.stderr, proc.stderr


def _final_model(directory: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.find_latest(directory)
    assert latest is not None
    return ckpt.load(latest)["model"]  # type: ignore[no-any-return]


def test_preempt_then_bitwise_resume_and_fallback(mpirun, tmp_path: Path) -> None:
    common = [
        "-m",
        "mpitrain",
        "--model",
        f"{MODELS}:signals",
        "--epochs",
        "2",
        "--no-progress",
        "--checkpoint-every",
        "5",
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    mpirun(2, [*common, "--checkpoint-dir", str(ref_dir)], extra_env={"TEST_STEP": "0"})
    # SIGUSR1 reaches rank 1 at step 12: all ranks stop together with a checkpoint, exit 99
    proc = mpirun(
        2, [*common, "--checkpoint-dir", str(run_dir)], check=False, extra_env={"TEST_STEP": "12"}
    )
    assert proc.returncode == 99, proc.stderr
    assert "preempted" in proc.stdout
    stopped = ckpt.find_latest(run_dir)
    assert stopped is not None and stopped.name == "step-000000012.pt"
    one = tmp_path / "one"  # keep the mid-run checkpoint for the 2 -> 1 resume below
    one.mkdir()
    for f in (stopped, stopped.with_name(stopped.name + ".sha256")):
        (one / f.name).write_bytes(f.read_bytes())
    res = mpirun(
        2,
        [*common, "--checkpoint-dir", str(run_dir), "--resume", "auto"],
        extra_env={"TEST_STEP": "0"},
    )
    assert "resumed from" in res.stdout
    ref, got = _final_model(ref_dir), _final_model(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # a damaged newest checkpoint: resume falls back to the previous one with a warning
    newest = ckpt.list_checkpoints(run_dir)[0]
    newest.write_bytes(newest.read_bytes()[:100])
    res = mpirun(
        2,
        [*common, "--checkpoint-dir", str(run_dir), "--resume", "auto"],
        extra_env={"TEST_STEP": "0"},
    )
    assert "skipping checkpoint" in res.stderr and "checksum mismatch" in res.stderr
    # a different rank count resumes too (2 -> 1), from the mid-run checkpoint
    s = tmp_path / "one.json"
    res = mpirun(
        1,
        [*common, "--checkpoint-dir", str(one), "--resume", "auto", "--summary-json", str(s)],
        extra_env={"TEST_STEP": "0"},
    )
    assert "saved by 2 ranks, now 1" in res.stdout
    assert _summary(s)["epochs"] == 2
