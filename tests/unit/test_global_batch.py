"""--global-batch: the per-rank batch and the lr policy when the number of ranks changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpitrain.config import TrainConfig
from mpitrain.errors import ConfigError
from mpitrain.train.optim import base_lr, global_batch, rank_batch


def test_default_policy_scales_lr_with_the_global_batch() -> None:
    cfg = TrainConfig().replace(batch_size=16, lr=0.1, accumulate=2)
    assert [rank_batch(cfg, n) for n in (2, 3, 4)] == [16, 16, 16]
    assert [global_batch(cfg, n) for n in (2, 3, 4)] == [64, 96, 128]
    assert [base_lr(cfg, n) for n in (2, 3, 4)] == pytest.approx([0.4, 0.6, 0.8])
    assert base_lr(cfg.replace(scale_lr=False), 4) == 0.1


def test_global_batch_is_kept_across_rank_counts() -> None:
    cfg = TrainConfig().replace(batch_size=16, lr=0.1, global_batch=96)
    assert [rank_batch(cfg, n) for n in (4, 2, 3)] == [24, 48, 32]
    assert {global_batch(cfg, n) for n in (4, 2, 3)} == {96}
    # lr is meant for --batch-size samples: x 96/16, the same on every rank count
    assert {round(base_lr(cfg, n), 12) for n in (4, 2, 3)} == {0.6}
    assert base_lr(cfg.replace(scale_lr=False), 3) == 0.1


def test_global_batch_that_does_not_divide_is_refused() -> None:
    cfg = TrainConfig().replace(global_batch=100, accumulate=2)
    with pytest.raises(ConfigError, match=r"--global-batch 100 does not divide by 3 ranks x "
                                          r"--accumulate 2.*HINT: use a multiple of 6"):
        rank_batch(cfg, 3)


def test_sample_log_writes_lines_and_refuses_an_unwritable_path(tmp_path: Path) -> None:
    import numpy as np

    from mpitrain.train.sample_log import SampleLog, read_sample_log

    log = SampleLog(str(tmp_path / "s"), rank=1, world_size=3)
    log.write(0, 5, np.array([7, 8, 9]), np.array([1, 0, 1]))  # padding left out
    log.close()
    assert read_sample_log(tmp_path / "s") == [(0, 5, 3, [7, 9])]
    with pytest.raises(ConfigError, match=r"--sample-log: cannot append to .*missing/s\.rank0"
                                          r".*HINT"):
        SampleLog(str(tmp_path / "missing" / "s"), rank=0, world_size=1)
