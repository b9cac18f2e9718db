"""The trainer end to end under mpiexec: accuracy, failures, bad input, checkpoints, resume."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.data import ShardedDataset

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
        (["--epochs", "many"], "bad value 'many'"),
        (["--precision", "fp16"], "fp16 needs a CUDA device"),
    ]:
        proc = mpirun(2, ["-m", "mpitrain", *args], timeout=60, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "HINT" in proc.stderr, proc.stderr

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


def _recorded_batches(path: Path) -> list[np.ndarray]:
    """The training inputs a TEST_RECORD run wrote (train_models.py), one array per step."""
    data = path.read_bytes()
    out, k = [], 0
    while k < len(data):
        n, width = (int(v) for v in np.frombuffer(data, np.int64, 2, k))
        k += 16
        out.append(np.frombuffer(data, np.float32, n * width, k).reshape(n, width))
        k += 4 * n * width
    return out


def _rows(batches: list[np.ndarray]) -> Counter[bytes]:
    """The multiset of samples (each row's bytes) in ``batches``."""
    return Counter(row.tobytes() for b in batches for row in b)


def _full_batches(samples: int, ranks: int, batch: int) -> int:
    """Samples one pass over ``samples`` trains on with drop_last (the sampler's math)."""
    return samples // ranks // batch * batch * ranks


def test_preempt_then_bitwise_resume_and_fallback(
    mpirun, tmp_path: Path, digits_cache: Path
) -> None:
    batch, stop_step = 32, 12
    common = [
        "-m",
        "mpitrain",
        "--model",
        f"{MODELS}:signals",
        "--epochs",
        "2",
        "--batch-size",
        str(batch),
        "--no-progress",
        "--checkpoint-every",
        "5",
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    rec_ref, rec_stop, rec_one = (tmp_path / f"rec-{n}" for n in ("ref", "stop", "one"))
    for d in (rec_ref, rec_stop, rec_one):
        d.mkdir()
    ref_json, res_json = tmp_path / "ref.json", tmp_path / "res.json"
    mpirun(
        2,
        [
            *common,
            "--checkpoint-dir",
            str(ref_dir),
            "--summary-json",
            str(ref_json),
            "--run-dir",
            str(tmp_path / "ref-run"),
        ],
        extra_env={"TEST_STEP": "0", "TEST_RECORD": str(rec_ref)},
    )
    # SIGUSR1 reaches rank 1 at step 12: all ranks stop together with a checkpoint, exit 99
    proc = mpirun(
        2,
        [*common, "--checkpoint-dir", str(run_dir)],
        check=False,
        extra_env={"TEST_STEP": str(stop_step), "TEST_RECORD": str(rec_stop)},
    )
    assert proc.returncode == 99, proc.stderr
    assert "preempted" in proc.stdout
    stopped = ckpt.find_latest(run_dir)
    assert stopped is not None and stopped.name == f"step-{stop_step:09d}.pt"
    stopped_state = ckpt.load(stopped)
    one = tmp_path / "one"  # keep the mid-run checkpoint for the 2 -> 1 resume below
    one.mkdir()
    for f in (stopped, stopped.with_name(stopped.name + ".sha256")):
        (one / f.name).write_bytes(f.read_bytes())
    res = mpirun(
        2,
        [
            *common,
            "--checkpoint-dir",
            str(run_dir),
            "--resume",
            "auto",
            "--summary-json",
            str(res_json),
            "--run-dir",
            str(tmp_path / "res-run"),
        ],
        extra_env={"TEST_STEP": "0"},
    )
    assert "resumed from" in res.stdout
    ref, got = _final_model(ref_dir), _final_model(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # the metrics too: the final epoch's train loss and the test evaluation, bit for bit
    ref_sum, res_sum = _summary(ref_json), _summary(res_json)
    assert ref_sum["test_loss"] is not None and ref_sum["test_accuracy"] is not None, ref_sum
    for key in ("steps", "final_loss", "test_loss", "test_accuracy"):
        assert res_sum[key] == ref_sum[key], (key, res_sum[key], ref_sum[key])
    # and each epoch's record, the interrupted first epoch included: its train loss and
    # accuracy add up per-rank sums from before the stop (restored from the checkpoint) and after
    ref_evals, res_evals = (
        [
            r
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").open())
            if r.get("kind") == "eval"
        ]
        for d in ("ref-run", "res-run")
    )
    assert [r["epoch"] for r in ref_evals] == [1, 2], ref_evals
    assert res_evals == ref_evals
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
        [
            *common,
            "--checkpoint-dir",
            str(one),
            "--resume",
            "auto",
            "--summary-json",
            str(s),
            "--run-dir",
            str(tmp_path / "one-run"),
        ],
        extra_env={"TEST_STEP": "0", "TEST_RECORD": str(rec_one)},
    )
    assert "saved by 2 ranks, now 1" in res.stdout
    assert _summary(s)["epochs"] == 2
    # ... and trains on the rest of the first epoch exactly once. drop_last: each step of 2
    # ranks takes the next 2 x 32 samples of the epoch's order; 1 rank then takes the full
    # batches of 32 of what is left, and the tail short of a batch is dropped
    n = len(ShardedDataset(digits_cache / "digits-v1", split="train"))
    before = stop_step * 2 * batch
    after = _full_batches(n - before, 1, batch)
    assert before + after == _full_batches(n, 2, batch)  # = what an uninterrupted epoch covers
    loop, sampler = stopped_state["loop"], stopped_state["sampler"]
    assert (loop["epoch"], loop["mid_epoch"], loop["step"]) == (0, True, stop_step), loop
    assert loop["samples_total"] == before, loop
    assert (sampler["epoch"], sampler["position"], sampler["num_samples"]) == (0, before, n)
    # the 1-rank run's records: its steps in the first epoch, where each epoch ended, and the
    # samples it counted (a step counts at most 32, so the total says every batch was full)
    records = [json.loads(r) for r in (tmp_path / "one-run" / "metrics.jsonl").open()]
    steps1 = [r["step"] for r in records if r.get("kind") != "eval" and r["epoch"] == 1]
    assert steps1 == list(range(stop_step + 1, stop_step + 1 + after // batch)), steps1
    ends = [(r["epoch"], r["step"]) for r in records if r.get("kind") == "eval"]
    epoch2 = _full_batches(n, 1, batch)
    assert ends == [(1, stop_step + after // batch), (2, stop_step + (after + epoch2) // batch)]
    latest = ckpt.find_latest(one)
    assert latest is not None
    final = ckpt.load(latest)["loop"]
    assert (final["epoch"], final["mid_epoch"]) == (2, False), final
    assert final["samples_total"] == before + after + epoch2, final
    # which samples: the stopped run's 12 steps on both ranks and the resumed run's steps in
    # the first epoch together are exactly the samples of the uninterrupted run's first epoch
    per_rank_steps = _full_batches(n, 2, batch) // 2 // batch
    ref_batches = [_recorded_batches(rec_ref / f"rank{r}.bin") for r in (0, 1)]
    assert [len(b) for b in ref_batches] == [2 * per_rank_steps] * 2
    ref_epoch = [*ref_batches[0][:per_rank_steps], *ref_batches[1][:per_rank_steps]]
    stop_batches = [_recorded_batches(rec_stop / f"rank{r}.bin") for r in (0, 1)]
    assert [len(b) for b in stop_batches] == [stop_step, stop_step]
    one_batches = _recorded_batches(rec_one / "rank0.bin")
    assert len(one_batches) == (after + epoch2) // batch
    resumed = [*stop_batches[0], *stop_batches[1], *one_batches[: after // batch]]
    assert sum(len(b) for b in resumed) == before + after
    got_rows, want_rows = _rows(resumed), _rows(ref_epoch)
    extra, missed = got_rows - want_rows, want_rows - got_rows
    assert not extra and not missed, (
        f"{extra.total()} samples trained on beyond the uninterrupted epoch (twice or from "
        f"outside it), {missed.total()} of its samples never trained on"
    )
