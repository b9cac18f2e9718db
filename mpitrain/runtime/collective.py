"""Decide rank-varying failures together, so every rank raises the same error."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mpitrain import errors

if TYPE_CHECKING:
    from mpi4py import MPI

T = TypeVar("T")


def agree(comm: MPI.Intracomm, fn: Callable[[], T]) -> T:
    """Collective: run ``fn`` on every rank; if it raised an MpitrainError anywhere, raise it
    on every rank (the lowest failing rank's error, prefixed with its rank when others differ).
    """
    result: T | None = None
    failure: tuple[str, str] | None = None
    try:
        result = fn()
    except errors.MpitrainError as exc:
        failure = (type(exc).__name__, str(exc))
    failures = comm.allgather(failure)
    for rank, item in enumerate(failures):
        if item is not None:
            cls = getattr(errors, item[0], errors.MpitrainError)
            message = item[1] if item[1].startswith("rank ") else f"rank {rank}: {item[1]}"
            raise cls(message)
    return result  # type: ignore[return-value]
