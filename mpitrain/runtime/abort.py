"""Abort the whole MPI job when any rank fails, instead of leaving the others hanging.

Every abort goes through :func:`abort_job`. It aborts ``MPI_COMM_WORLD``, through the launcher
(MPICH aborts a duplicated communicator by messaging every rank of it and waiting for
delivery: a node cut off from the network blocks that for ever and the launcher never hears
of it), and a rank whose abort has not ended it within ``EXIT_AFTER_ABORT_S`` seconds ends its
own process with the abort's exit code.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

from mpitrain.errors import MpitrainError

if TYPE_CHECKING:
    from mpi4py import MPI

#: seconds a rank gives ``MPI_Abort`` to end it before it ends its own process
EXIT_AFTER_ABORT_S = 3.0
#: seconds the last words before that exit may take (stderr may be a pipe nobody drains)
LAST_WORDS_S = 0.5


def _exit_now(rank: int, code: int, waited: float) -> NoReturn:
    """Say why on stderr (at most ``LAST_WORDS_S``; the pipe may be stuck), then ``_exit``."""

    def say() -> None:
        try:
            sys.stderr.write(
                f"rank {rank} on {socket.gethostname()}: MPI_Abort did not end this process "
                f"within {waited:g} s (a peer or the launcher is unreachable); exiting with "
                f"code {code}\n"
            )
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    words = threading.Thread(target=say, name="mpitrain-last-words", daemon=True)
    words.start()
    words.join(LAST_WORDS_S)
    os._exit(code)


def abort_job(comm: MPI.Comm, code: int, *, within: float = EXIT_AFTER_ABORT_S) -> NoReturn:
    """End the whole job with exit ``code`` (from any thread; never returns).

    1. A daemon timer calls ``os._exit(code)`` after ``within`` seconds: the abort may block,
       spin, or return without anyone ending this process (a peer or the launcher out of
       reach).
    2. ``MPI_Abort(MPI_COMM_WORLD, code)``, not on ``comm`` (a duplicate of the world, as every
       communicator here spans it): the world's abort goes to the launcher (PMI), which ends
       every rank it can reach at once and exits with ``code`` (MPICH's ``MPI_Abort`` then
       returns, and this rank waits to be killed). MPICH aborts a duplicate by delivering a
       message to every rank of it and waits for that, for ever when one is cut off, and the
       launcher never hears of it.
    3. Through ctypes, which releases the GIL: mpi4py's ``Comm.Abort`` holds it, so the timer
       could not run. ``comm.Abort`` only where that is not available (``comm`` is not an
       mpi4py communicator, or libmpi has no ``MPI_Abort`` symbol).
    """
    from mpi4py import MPI

    rank = comm.Get_rank()
    timer = threading.Timer(within, _exit_now, args=(rank, code, within))
    timer.name = "mpitrain-abort-exit"
    timer.daemon = True
    timer.start()
    target = MPI.COMM_WORLD if isinstance(comm, MPI.Comm) else comm
    mpi_abort = _mpi_abort_without_gil(target)
    if mpi_abort is not None:
        mpi_abort(code)
    else:
        target.Abort(code)
    threading.Event().wait()  # GIL released: the launcher's kill or the timer ends us
    os._exit(code)  # not reached


def _mpi_abort_without_gil(comm: MPI.Comm) -> Callable[[int], object] | None:
    """Return ``MPI_Abort(comm, .)`` as a ctypes call, which releases the GIL while it runs.

    None when ``comm`` is not an mpi4py communicator or libmpi's ``MPI_Abort`` is not found.
    """
    try:
        from mpi4py import MPI

        handle = MPI._handleof(comm)
        lib = ctypes.CDLL(MPI.__file__, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
        fn = lib.MPI_Abort  # dlsym searches mpi4py's extension, then the libmpi it links
    except (ImportError, TypeError, AttributeError, OSError):
        return None
    if MPI._sizeof(MPI.Comm) == ctypes.sizeof(ctypes.c_int):  # MPICH: an int handle
        arg: ctypes.c_int | ctypes.c_void_p = ctypes.c_int(
            int.from_bytes((handle & 0xFFFFFFFF).to_bytes(4, "little"), "little", signed=True)
        )
    else:  # Open MPI, the standard MPI ABI: a pointer
        arg = ctypes.c_void_p(handle)
    fn.argtypes = [type(arg), ctypes.c_int]
    fn.restype = ctypes.c_int
    return lambda code: fn(arg, code)


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
        abort_job(comm, code)


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


def _end_together(errcomm: MPI.Intracomm, comm: MPI.Comm, exc: BaseException | None,
                  code: int, grace: float) -> int:
    """End the job after an expected failure (MpitrainError, argparse's exit) on this rank.

    Every rank that fails enters a barrier on ``errcomm`` (a communicator used for nothing
    else). When all ranks reach it within ``grace`` seconds the failure is shared: rank 0
    prints each distinct message once and every rank returns the largest exit code. When some
    rank does not arrive (it is waiting in a collective this rank will never reach), this
    rank prints its own message, naming itself, and aborts the whole job.
    """
    from mpi4py import MPI

    message = str(exc) if exc is not None else None
    host = socket.gethostname()
    size = errcomm.Get_size()
    if size == 1:
        if message is not None:
            sys.stderr.write(f"mpitrain: error: {message}\n")
        return code
    request = errcomm.Ibarrier()
    deadline = time.monotonic() + grace
    while not request.Test():
        if time.monotonic() > deadline:
            rank = errcomm.Get_rank()
            text = message if message is not None else f"exit code {code}"
            sys.stderr.write(
                f"mpitrain: error: rank {rank}/{size} on {host}: {text} "
                f"(other ranks did not fail within {grace:g} s: aborting the job)\n"
            )
            sys.stderr.flush()
            sys.stdout.flush()
            abort_job(comm, code)
        time.sleep(0.01)
    reports = errcomm.gather((message, host), root=0)
    worst = int(errcomm.allreduce(code, op=MPI.MAX))
    if reports is not None:
        _print_shared(reports)
    return worst


def _print_shared(reports: list[tuple[str | None, str]]) -> None:
    """Print each distinct failure once (with its ranks when the ranks' messages differ)."""
    distinct: dict[str, list[int]] = {}
    for rank, (message, _host) in enumerate(reports):
        if message is not None:
            distinct.setdefault(message, []).append(rank)
    for message, ranks in distinct.items():
        if len(distinct) == 1:
            sys.stderr.write(f"mpitrain: error: {message}\n")
        else:
            names = ",".join(str(r) for r in ranks)
            hosts = sorted({reports[r][1] for r in ranks})
            sys.stderr.write(f"mpitrain: error: rank {names} on {','.join(hosts)}: {message}\n")
    sys.stderr.flush()


def run_mpi(main: Callable[[MPI.Intracomm], int], *, grace: float = 5.0) -> int:
    """Run an MPI entry point so that any failure on any rank ends the whole job.

    ``main`` gets a duplicate of COMM_WORLD. An uncaught exception (in any thread) prints
    ``rank R/N on HOST`` and its traceback and aborts the job at once. An MpitrainError or a
    non-zero ``SystemExit`` (argparse) is decided together: when every rank fails within
    ``grace`` seconds the job exits with the error's code and rank 0 prints it once; when only
    some ranks fail they print their reason and abort the job (see :func:`_end_together`).

    Returns:
        The exit code for ``sys.exit``.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    errcomm = MPI.COMM_WORLD.Dup()
    install_excepthook(comm)
    try:
        return int(main(comm))
    except MpitrainError as exc:
        return _end_together(errcomm, comm, exc, exc.exit_code, grace)
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return 0
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
        return _end_together(errcomm, comm, None, code, grace)
    except BaseException as exc:
        abort(comm, exc)
        return 1
