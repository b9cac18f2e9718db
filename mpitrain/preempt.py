"""Preemption: signals only set a flag; ranks agree at a step boundary to stop and save."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

#: exit code of a run that stopped on a preemption signal after writing a checkpoint
PREEMPTED_EXIT_CODE = 99


def parse_signals(spec: str) -> list[signal.Signals]:
    """Parse ``"USR1,TERM"`` into signal numbers."""
    out: list[signal.Signals] = []
    for raw in spec.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            out.append(signal.Signals[name])
        except KeyError:
            raise ConfigError(
                with_hint(
                    f"option 'preempt_signals': unknown signal '{raw.strip()}'",
                    "use names like USR1,TERM",
                )
            ) from None
    return out


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
