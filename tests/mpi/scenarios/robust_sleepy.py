"""Test-only model factories for the trainer's never-hang tests.

``--model tests.mpi.scenarios.robust_sleepy:factory`` sleeps (a hang) and
``--model tests.mpi.scenarios.robust_sleepy:killer`` SIGKILLs itself, on rank
ROBUST_RANK (default 1) at training forward call ROBUST_STEP (default 3).
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


def sleepy_forward(seconds: float) -> None:
    """The hang: the watchdog must show this function in rank 1's stack."""
    time.sleep(seconds)


class _Misbehaving(nn.Module):
    def __init__(self, cfg: Any, action: str) -> None:
        super().__init__()
        self.inner = MLP(64, 10, cfg.hidden)
        self.action = action
        self.calls = 0
        self.hit = MPI.COMM_WORLD.Get_rank() == int(os.environ.get("ROBUST_RANK", "1"))
        self.at = int(os.environ.get("ROBUST_STEP", "3"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.hit and self.calls == self.at:
                if self.action == "sleep":
                    sleepy_forward(600)
                else:
                    print(f"rank {MPI.COMM_WORLD.Get_rank()}: SIGKILL myself", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)  # type: ignore[no-any-return]


def factory(cfg: Any) -> nn.Module:
    """MLP that sleeps 600 s on ROBUST_RANK at ROBUST_STEP."""
    return _Misbehaving(cfg, "sleep")


def killer(cfg: Any) -> nn.Module:
    """MLP that kills its own process with SIGKILL on ROBUST_RANK at ROBUST_STEP."""
    return _Misbehaving(cfg, "kill")
