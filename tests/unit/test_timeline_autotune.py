"""Serial tests of the bucket autotuner's bookkeeping (one rank, fed step times)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.grad.autotune import AutotuneResult, BucketAutotuner, rebucket


def model() -> DataParallel:
    torch.manual_seed(0)
    return DataParallel(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2)),
                        comm=MPI.COMM_SELF, bucket_mb=4)


def test_table_and_state_round_trip() -> None:
    r = AutotuneResult(4.0, ((1.0, 13.94), (4.0, 12.6), (16.0, 12.9)))
    assert r.table() == "bucket 1 MiB: 13.9 ms/step, 4 MiB: 12.6, 16 MiB: 12.9 -> 4 MiB"
    assert AutotuneResult.from_state_dict(r.state_dict()) == r


def test_search_scores_medians_and_keeps_the_fastest() -> None:
    m = model()
    tuner = BucketAutotuner(MPI.COMM_SELF, candidates=(0.01, 1.0, 16.0), warmup=1,
                            trial_steps=3)
    tuner.start(m)
    assert len(m.engine.buckets) == 4
    # per candidate: one warm-up step (ignored), then three timed steps (median)
    feed = [9.0, 0.030, 0.010, 0.020,   # 0.01 MiB: median 20 ms
            9.0, 0.012, 0.011, 0.500,   # 1 MiB: median 12 ms (one outlier ignored)
            9.0, 0.015, 0.016, 0.014]   # 16 MiB: median 15 ms
    results = [tuner.after_step(m, s) for s in feed]
    assert results[:-1] == [None] * 11
    res = results[-1]
    assert res is not None and res.chosen_mb == 1.0
    assert [mb for mb, _ in res.trials] == [0.01, 1.0, 16.0]
    assert [ms for _, ms in res.trials] == pytest.approx([20.0, 12.0, 15.0])
    assert len(m.engine.buckets) == 1 and tuner.done
    assert tuner.after_step(m, 1.0) is None


def test_rebucket_keeps_gradients_and_training_working() -> None:
    m = model()
    m(torch.randn(4, 64)).sum().backward()
    m.synchronize()
    before = [p.grad.clone() for p in m.parameters()]  # type: ignore[union-attr]
    rebucket(m, 0.01)
    assert len(m.engine.buckets) == 4
    for p, g in zip(m.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]
    m.zero_grad()
    m(torch.randn(4, 64)).sum().backward()
    m.synchronize()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bucket_mb_auto_is_config_and_refused_where_it_cannot_apply() -> None:
    import pytest

    from mpitrain.config import resolve
    from mpitrain.errors import ConfigError

    assert resolve({"bucket_mb": "auto"}, environ={}).bucket_mb == 0.0
    assert resolve({}, environ={"MPITRAIN_BUCKET_MB": "AUTO"}).bucket_mb == 0.0
    assert resolve({"bucket_mb": "4"}, environ={}).bucket_mb == 4.0
    for other in ({"exchange": "local-sgd"}, {"shard": "gradients"}):
        with pytest.raises(ConfigError, match="--bucket-mb auto"):
            resolve({"bucket_mb": "auto", **other}, environ={})


def test_overlap_is_searched_where_the_mpi_was_never_measured() -> None:
    m = model()
    base = m.engine.overlap
    tuner = BucketAutotuner(MPI.COMM_SELF, candidates=(0.01, 16.0), warmup=0, trial_steps=2,
                            tune_overlap=True)
    tuner.start(m)
    feed = [0.020, 0.020,   # 0.01 MiB: 20 ms
            0.010, 0.010,   # 16 MiB: 10 ms (the size kept)
            0.005, 0.005]   # 16 MiB with overlap flipped: 5 ms, kept as well
    results = [tuner.after_step(m, s) for s in feed]
    assert results[:-1] == [None] * 5
    res = results[-1]
    assert res is not None and res.chosen_mb == 16.0 and res.chosen_overlap is (not base)
    assert m.engine.overlap is (not base) and len(m.engine.buckets) == 1
    on_off = "off" if base else "on"
    assert res.table().endswith(f"-> 16 MiB; overlap {'on' if base else 'off'}: 10.0, "
                                f"{on_off}: 5.0 -> {on_off}")
    assert AutotuneResult.from_state_dict(res.state_dict()) == res
    # a resumed run starts with the chosen size and overlap, without searching
    again = model()
    tuner2 = BucketAutotuner(MPI.COMM_SELF, tune_overlap=True)
    tuner2.load_state_dict(res.state_dict())
    tuner2.start(again)
    assert again.engine.overlap is (not base) and tuner2.done
    # slower flipped: the default is kept
    m3 = model()
    t3 = BucketAutotuner(MPI.COMM_SELF, candidates=(16.0,), warmup=0, trial_steps=1,
                         tune_overlap=True)
    t3.start(m3)
    assert t3.after_step(m3, 0.010) is None
    r3 = t3.after_step(m3, 0.050)
    assert r3 is not None and r3.chosen_overlap is base and m3.engine.overlap is base


def test_old_checkpoints_without_overlap_keys_load() -> None:
    r = AutotuneResult.from_state_dict({"chosen_mb": 4.0, "trials": [[4.0, 12.0]]})
    assert r.chosen_overlap is None and r.overlap_trials == ()
