"""Serial pieces of the trainer: schedules, models, preemption flag, RNG state round trip."""

from __future__ import annotations

import itertools
import os
import random
import signal

import numpy as np
import pytest
import torch

from mpitrain.config import TrainConfig
from mpitrain.errors import ConfigError
from mpitrain.preempt import PreemptFlag, parse_signals
from mpitrain.train.models import build_model
from mpitrain.train.optim import base_lr, lr_factor
from mpitrain.train.state import rng_state, set_rng_state


def test_warmup_then_cosine() -> None:
    cfg = TrainConfig(epochs=2, warmup_epochs=1.0, lr_schedule="cosine")
    f = [lr_factor(cfg, s, 10) for s in range(20)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[19] < 0.05
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_step_schedule_and_scaling() -> None:
    cfg = TrainConfig(lr_schedule="step", step_every=1, lr=0.1, scale_lr=True, warmup_epochs=0)
    assert lr_factor(cfg, 9, 10) == 1.0 and lr_factor(cfg, 10, 10) == pytest.approx(0.1)
    assert base_lr(cfg, 4) == pytest.approx(0.4)


def test_models_shapes() -> None:
    x = torch.randn(5, 8, 8)
    for name in ("mlp", "cnn"):
        m = build_model(TrainConfig(model=name), (8, 8), 10)
        assert m(x).shape == (5, 10)
    with pytest.raises(ConfigError, match="square"):
        build_model(TrainConfig(model="cnn"), (7,), 3)
    with pytest.raises(ConfigError, match="cannot import"):
        build_model(TrainConfig(model="no_such_mod:f"), (4,), 2)


def test_preempt_flag_records_first_signal() -> None:
    flag = PreemptFlag(parse_signals("USR1,term")).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == signal.SIGUSR1
    finally:
        flag.uninstall()
    with pytest.raises(ConfigError, match="unknown signal"):
        parse_signals("USR9")


def test_rng_roundtrip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_step_agreement_lag(lag: int) -> None:
    """Step t's bits come back at step t + lag (0 before), on every rank alike."""
    from mpi4py import MPI

    from mpitrain.train.agree import StepAgreement

    ag = StepAgreement(MPI.COMM_SELF, lag)
    sent = [0, 1, 0, 2, 3, 0, 0, 0]
    got = [ag.exchange(b) for b in sent]
    assert got == [0] * lag + sent[: len(sent) - lag]
    ag.drain()
    assert not ag._pending
    with pytest.raises(ValueError):
        StepAgreement(MPI.COMM_SELF, -1)


def test_straggler_rank_last_or_seeded_random() -> None:
    from mpitrain.train.straggler import straggler_rank

    assert {straggler_rank("last", 0, s, 4) for s in range(20)} == {3}
    picks = [straggler_rank("random", 0, s, 4) for s in range(200)]
    assert picks == [straggler_rank("random", 0, s, 4) for s in range(200)]  # deterministic
    assert set(picks) == {0, 1, 2, 3}  # every rank gets slowed at some step


def test_agreement_lag_per_mode() -> None:
    from mpitrain.train.agree import agreement_lag

    assert agreement_lag(TrainConfig()) == 0
    assert agreement_lag(TrainConfig(exchange="double-buffer")) == 1
    assert agreement_lag(TrainConfig(exchange="local-sgd", local_steps=4)) == 3
    assert agreement_lag(TrainConfig(exchange="local-sgd", local_steps=1)) == 0
    assert agreement_lag(TrainConfig(exchange="param-server", max_staleness=2)) == 2
