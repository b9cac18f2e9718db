"""Align the monotonic clocks of all ranks to rank 0's: offsets by ping-pong, drift by a line.

Each rank's clock is ``local = reference + offset(t)``. :func:`estimate_offset` measures the
offset once (NTP style: rank 0 sends, rank r answers with its clock, rank 0 takes the midpoint
of the round trip with the smallest round-trip time); measured at the start and again at the
end of recording, the two samples give a straight line, which corrects a constant drift
(:class:`ClockFit`). The error of one sample is at most half its round-trip time, so the line
is used only when the two offsets differ by more than both errors together; otherwise (a
loaded machine can stretch a round trip to milliseconds, which would fake a drift) the
offset of the sample with the shorter round trip is used throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

Clock = Callable[[], int]

#: ping-pong rounds per rank; the one with the smallest round trip is kept
ROUNDS = 16
_TAG = 0x7A1E


@dataclass(frozen=True)
class ClockSample:
    """One offset measurement: at local time ``local_ns`` this clock read ``offset_ns`` ahead."""

    local_ns: int
    offset_ns: int
    rtt_ns: int


@dataclass(frozen=True)
class ClockFit:
    """Map this rank's clock to rank 0's, linearly between a start and an end sample."""

    start: ClockSample
    end: ClockSample | None = None

    @property
    def drifts(self) -> bool:
        """Whether the end sample shows a drift larger than the two samples' errors."""
        s, e = self.start, self.end
        if e is None or e.local_ns == s.local_ns:
            return False
        return abs(e.offset_ns - s.offset_ns) > (s.rtt_ns + e.rtt_ns) / 2

    def offset_at(self, local_ns: int) -> float:
        """The offset (ns) at local time ``local_ns`` (a line through both samples if it drifts)."""
        s, e = self.start, self.end
        if e is None:
            return float(s.offset_ns)
        if not self.drifts:
            return float(s.offset_ns if s.rtt_ns <= e.rtt_ns else e.offset_ns)
        slope = (e.offset_ns - s.offset_ns) / (e.local_ns - s.local_ns)
        return s.offset_ns + slope * (local_ns - s.local_ns)

    def align(self, local_ns: int) -> float:
        """Return ``local_ns`` on rank 0's clock (ns)."""
        return local_ns - self.offset_at(local_ns)

    @property
    def bound_ns(self) -> int:
        """Error bound of the fit: half the round trip of the sample(s) it uses."""
        s, e = self.start, self.end
        if e is None:
            return s.rtt_ns // 2
        if not self.drifts:
            return min(s.rtt_ns, e.rtt_ns) // 2
        return max(s.rtt_ns, e.rtt_ns) // 2

    @property
    def drift_ppm(self) -> float:
        """Clock drift relative to rank 0, parts per million (0 when not measurable)."""
        s, e = self.start, self.end
        if e is None or not self.drifts:
            return 0.0
        return 1e6 * (e.offset_ns - s.offset_ns) / (e.local_ns - s.local_ns)


def estimate_offset(comm: MPI.Intracomm, clock: Clock, rounds: int = ROUNDS) -> ClockSample:
    """Collective: measure this rank's clock offset from rank 0's (rank 0 gets offset 0).

    Rank 0 exchanges ``rounds`` ping-pongs with each other rank in turn; for each the
    round with the smallest round-trip time gives ``offset = t_r - (t_send + t_recv) / 2``.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    comm.Barrier()
    if rank == 0:
        results: list[tuple[int, int, int]] = [(0, 0, 0)]
        for r in range(1, size):
            best: tuple[int, int, int] | None = None
            for _ in range(rounds):
                t0 = clock()
                comm.send(None, dest=r, tag=_TAG)
                t_r = comm.recv(source=r, tag=_TAG)
                t1 = clock()
                rtt = t1 - t0
                if best is None or rtt < best[1]:
                    best = (t_r - (t0 + t1) // 2, rtt, t_r)
            assert best is not None
            results.append(best)
        mine = comm.scatter(results, root=0)
    else:
        for _ in range(rounds):
            comm.recv(source=0, tag=_TAG)
            comm.send(clock(), dest=0, tag=_TAG)
        mine = comm.scatter(None, root=0)
    offset, rtt, t_r = mine
    # the sample's time is when this rank answered the best round (rank 0: now, offset 0)
    return ClockSample(local_ns=int(t_r) if rank else clock(), offset_ns=int(offset),
                       rtt_ns=int(rtt))
