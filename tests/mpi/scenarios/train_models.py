"""Test-only model factories for trainer scenarios (``--model tests.mpi.scenarios.train_models:X``).

Each wraps the built-in MLP and misbehaves on one rank at one training step, chosen by
environment variables the test sets: ``TEST_RANK`` (default 1) and ``TEST_STEP`` (default 3).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from mpitrain.train.models import MLP


class _Faulty(nn.Module):
    def __init__(self, cfg: Any, action: str) -> None:
        super().__init__()
        self.inner = MLP(64, 10, cfg.hidden)
        self.action = action
        self.calls = 0
        self.rank = MPI.COMM_WORLD.Get_rank()
        self.target_rank = int(os.environ.get("TEST_RANK", "1"))
        self.target_step = int(os.environ.get("TEST_STEP", "3"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.rank == self.target_rank and self.calls == self.target_step:
                self.misbehave()
        return self.inner(x)  # type: ignore[no-any-return]

    def misbehave(self) -> None:
        if self.action == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank}")
        if self.action == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.action == "sleep":
            time.sleep(float(os.environ.get("TEST_SLEEP", "60")))
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)


def raises(cfg: Any) -> nn.Module:
    """Raise RuntimeError on TEST_RANK at TEST_STEP."""
    return _Faulty(cfg, "raise")


def signals(cfg: Any) -> nn.Module:
    """Send SIGUSR1 to this process on TEST_RANK at TEST_STEP (a preemption notice)."""
    return _Faulty(cfg, "signal")


def sleeps(cfg: Any) -> nn.Module:
    """Sleep TEST_SLEEP seconds on TEST_RANK at TEST_STEP (a hang)."""
    return _Faulty(cfg, "sleep")


def killed(cfg: Any) -> nn.Module:
    """SIGKILL this process on TEST_RANK at TEST_STEP."""
    return _Faulty(cfg, "kill")


def extra_layer(cfg: Any) -> nn.Module:
    """An MLP with one more layer on rank 1 than elsewhere (a model mismatch)."""
    m = MLP(64, 10, cfg.hidden)
    if MPI.COMM_WORLD.Get_rank() == 1:
        m.net.append(nn.Linear(10, 10))
    return m
