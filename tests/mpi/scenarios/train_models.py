"""Test-only model factories for trainer scenarios (``--model tests.mpi.scenarios.train_models:X``).

Each wraps the built-in MLP and misbehaves on one rank at one training step, chosen by
environment variables the test sets: ``TEST_RANK`` (default 1) and ``TEST_STEP`` (default 3).
With ``TEST_RECORD`` set to a directory, every rank appends each training batch's inputs to
``rank<R>.bin`` there (per batch: int64 rows, int64 width, the float32 rows), so a test can
check which samples a run trained on.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
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
        record = os.environ.get("TEST_RECORD")
        self.record = os.path.join(record, f"rank{self.rank}.bin") if record else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.record is not None:
                rows = x.detach().cpu().to(torch.float32).reshape(len(x), -1).numpy()
                with open(self.record, "ab") as f:
                    f.write(np.int64(rows.shape[0]).tobytes() + np.int64(rows.shape[1]).tobytes())
                    f.write(rows.tobytes())
            if self.rank == self.target_rank and self.calls == self.target_step:
                self.misbehave()
        return self.inner(x)  # type: ignore[no-any-return]

    def misbehave(self) -> None:
        if self.action == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank}")
        if self.action == "config":
            from mpitrain.errors import ConfigError

            raise ConfigError(f"injected node-local config problem on rank {self.rank}. HINT: x")
        if self.action == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.action == "sleep":
            time.sleep(float(os.environ.get("TEST_SLEEP", "60")))
        if self.action == "kill":
            # the pid lets a test match the launcher's report of the dead process to this rank
            print(f"rank {self.rank} (pid {os.getpid()}): SIGKILL myself", flush=True)
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
    """SIGKILL this process on TEST_RANK at TEST_STEP, after printing its rank and pid."""
    return _Faulty(cfg, "kill")


def extra_layer(cfg: Any) -> nn.Module:
    """An MLP with one more layer on rank 1 than elsewhere (a model mismatch)."""
    m = MLP(64, 10, cfg.hidden)
    if MPI.COMM_WORLD.Get_rank() == 1:
        m.net.append(nn.Linear(10, 10))
    return m


def config_error(cfg: Any) -> nn.Module:
    """Raise ConfigError on TEST_RANK at TEST_STEP (a rank-varying failure mid-run)."""
    return _Faulty(cfg, "config")


def config_error_everywhere(cfg: Any) -> nn.Module:
    """Raise the same ConfigError on every rank while building the model."""
    from mpitrain.errors import ConfigError

    raise ConfigError("injected config problem on every rank. HINT: fix the config")


class _Slow(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.inner = MLP(64, 10, cfg.hidden)
        self.pause = float(os.environ.get("TEST_PAUSE", "0.02"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.pause)
        return self.inner(x)  # type: ignore[no-any-return]


def slow(cfg: Any) -> nn.Module:
    """The MLP with a TEST_PAUSE-second sleep per training forward (a run that lasts)."""
    return _Slow(cfg)


def signal_at_build(cfg: Any) -> nn.Module:
    """Send SIGUSR1 to this process while the model is built (start-up), on TEST_RANK."""
    if MPI.COMM_WORLD.Get_rank() == int(os.environ.get("TEST_RANK", "1")):
        os.kill(os.getpid(), signal.SIGUSR1)
    return MLP(64, 10, cfg.hidden)
