"""Per-step agreement of flags (preemption, time-based checkpoint) across ranks.

Every step the ranks OR a few bits together, so that a signal seen by one rank stops all of
them at the same step. Done blocking, this is a barrier per step. With ``lag`` L > 0 the
all-reduce of step t is non-blocking and its result is used at step t + L on every rank: the
decision is still taken at the same step everywhere, but a fast rank may run up to L steps
ahead of a slow one (what the asynchronous exchange modes need to absorb a slow step).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig


def agreement_lag(cfg: TrainConfig) -> int:
    """Steps by which the exchange mode lets ranks drift apart, so the flags may come late.

    Read from the mode's registry row (``mpitrain.grad.protocol``): sync 0 (the all-reduce
    synchronises every step anyway), double-buffer 1 (step t waits for step t-1's
    all-reduce), local SGD H - 1 (ranks meet at every model average), param-server tau.
    """
    from mpitrain.grad.protocol import agreement_lag as mode_lag

    return mode_lag(cfg)


class StepAgreement:
    """Agree on per-step bits (bitwise OR over ``comm``), at once or ``lag`` steps late."""

    def __init__(self, comm: MPI.Intracomm, lag: int = 0) -> None:
        if lag < 0:
            raise ValueError(f"lag must be >= 0, got {lag}")
        self.comm = comm
        self.lag = lag
        self._pending: deque[tuple[Any, np.ndarray, np.ndarray]] = deque()

    def exchange(self, bits: int) -> int:
        """Collective: contribute this step's ``bits``; return the bits agreed for this step.

        With ``lag`` L the result is the OR of what every rank contributed L steps earlier
        (0 for the first L steps).
        """
        from mpi4py import MPI

        if self.lag == 0:
            return int(self.comm.allreduce(bits, op=MPI.BOR))
        send = np.array([bits], dtype=np.int32)
        recv = np.zeros(1, dtype=np.int32)
        req = self.comm.Iallreduce(send, recv, op=MPI.BOR)
        self._pending.append((req, send, recv))  # buffers live until the request completes
        if len(self._pending) <= self.lag:
            req.Test()  # drive progress; the result is used later
            return 0
        old, _, value = self._pending.popleft()
        old.Wait()
        return int(value[0])

    def drain(self) -> None:
        """Collective: complete every outstanding agreement (their results are dropped)."""
        while self._pending:
            req, _, _ = self._pending.popleft()
            req.Wait()
