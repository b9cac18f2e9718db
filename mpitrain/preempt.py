"""Preemption: signals only set a flag; ranks agree at a step boundary to stop and save."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

#: exit code of a run that stopped on a preemption signal after writing a checkpoint
PREEMPTED_EXIT_CODE = 99
#: the signals handled from process start, before the config is read (``preempt_signals``)
DEFAULT_SIGNALS = "USR1,TERM"


def parse_signals(spec: str) -> list[signal.Signals]:
    """Parse ``"USR1,TERM"`` into signals (see :func:`mpitrain.config.parse_signals`).

    Raises:
        ConfigError: for an unknown name, or one that cannot stop a run safely (KILL, CHLD ...).
    """
    from mpitrain.config_values import parse_signals as parse

    return parse(spec)


class PreemptFlag:
    """Signal handlers that record a stop request; :meth:`agreed` decides it collectively."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptFlag:
        """Install the handlers (main thread only); returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def switch(self, signals: list[signal.Signals]) -> PreemptFlag:
        """Handle exactly ``signals`` from now on (the configured set); returns self.

        A signal already received that the new set does not list is delivered again with its
        previous handler (by default it ends the process), as if it had never been caught.
        """
        dropped = [s for s in self._previous if s not in signals]
        for sig in signals:
            if sig not in self._previous and threading.current_thread() is threading.main_thread():
                self._previous[sig] = signal.signal(sig, self._handle)
        self.signals = list(signals)
        for sig in dropped:
            signal.signal(sig, self._previous.pop(sig))  # type: ignore[arg-type]
        if self.received is not None and self.received not in signals:
            late, self.received = self.received, None
            signal.raise_signal(late)
        return self

    def note(self, sig: signal.Signals) -> None:
        """Record a stop request that reached another process (a parameter server)."""
        if self.received is None:
            self.received = sig

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: saving happens at a step boundary, so a second signal is harmless.
        if self.received is None:
            self.received = signal.Signals(signum)

    def agreed(self, comm: MPI.Intracomm) -> bool:
        """Collective: return True on every rank when any rank received a stop signal."""
        from mpi4py import MPI

        return bool(comm.allreduce(self.received is not None, op=MPI.LOR))
