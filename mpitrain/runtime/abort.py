"""Abort the whole MPI job when any rank fails, instead of leaving the others hanging."""

from __future__ import annotations

import socket
import sys
import threading
import traceback
from types import TracebackType
from typing import TYPE_CHECKING

from mpitrain.errors import MpitrainError

if TYPE_CHECKING:
    from mpi4py import MPI


def format_failure(rank: int, size: int, exc: BaseException) -> str:
    """Return the report printed before aborting: ``rank R/N on HOST: ...``."""
    head = f"rank {rank}/{size} on {socket.gethostname()}"
    if isinstance(exc, MpitrainError):
        return f"{head}: {type(exc).__name__}: {exc}\n"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{head}: unhandled exception, aborting the job\n{tb}"


def abort(comm: MPI.Comm, exc: BaseException) -> None:
    """Print the failure of this rank and abort every rank of ``comm`` (does not return)."""
    try:
        sys.stderr.write(format_failure(comm.Get_rank(), comm.Get_size(), exc))
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        code = exc.exit_code if isinstance(exc, MpitrainError) else 1
        if comm.Get_size() == 1:
            # nothing to wake up; a normal exit keeps the exit code visible to the caller
            raise SystemExit(code)
        comm.Abort(code)


def install_excepthook(comm: MPI.Comm) -> None:
    """Make an uncaught exception in any thread of this rank abort the whole job."""

    def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(etype, KeyboardInterrupt | SystemExit):
            sys.__excepthook__(etype, value, tb)
            return
        abort(comm, value)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or isinstance(args.exc_value, SystemExit):
            return
        abort(comm, args.exc_value)

    sys.excepthook = hook
    threading.excepthook = thread_hook
