"""Watchdog decision logic (pure) and firing with an injected clock on COMM_SELF."""

from __future__ import annotations

import pytest

from mpitrain.runtime.watchdog import (
    RankState,
    Watchdog,
    format_table,
    late_ranks,
    stack_summary,
)


def _st(rank: int, entered: int, phase: str = "allreduce") -> RankState:
    return RankState(rank, "h", 7, True, phase, 64, 3.0, entered)


def test_rank_behind_in_entered_phases_is_late() -> None:
    reports = {0: _st(0, 12), 1: _st(1, 11, "forward"), 2: _st(2, 12), 3: None}
    v = late_ranks(reports, 4)
    assert v.late == [1]
    assert v.missing == [3]
    assert v.waiting == [0, 2]
    assert v.phase == "allreduce"
    text = format_table(reports, 4, 5.0, v)
    assert "late: rank 1 (not inside 'allreduce' where ranks 0,2 wait)" in text
    assert "never answered: rank 3" in text
    assert "NO ANSWER" in text


def test_all_in_same_collective_blames_nobody_in_python() -> None:
    v = late_ranks({0: _st(0, 5), 1: _st(1, 5)}, 2)
    assert v.late == [] and v.missing == []
    assert "none is late in Python" in format_table({0: _st(0, 5), 1: _st(1, 5)}, 2, 1.0, v)


def test_nobody_answered() -> None:
    v = late_ranks({}, 2)
    assert v.missing == [0, 1] and v.late == []


def test_fires_only_after_timeout_with_injected_clock(capfd) -> None:
    from mpi4py import MPI

    now = [100.0]
    aborted: list[int] = []
    dog = Watchdog.create(
        MPI.COMM_SELF, 10.0, grace=0.0, clock=lambda: now[0], abort=aborted.append, poll=0.01
    )
    try:
        dog.step_started(1)
        dog.enter("allreduce", 128)
        now[0] = 109.0
        assert not dog.fired.wait(0.2)
        dog.step_done()
        now[0] = 200.0
        assert not dog.fired.wait(0.2)  # disarmed: no fire
        dog.step_started(2)
        now[0] = 211.0
        assert dog.fired.wait(5)
        dog._thread.join(5)
        assert aborted == [1]
    finally:
        dog.close()
        dog.close()  # twice is fine
    err = capfd.readouterr().err
    assert "watchdog rank 0/1" in err and "step not done within 10 s" in err
    assert "allreduce 128 B" in err
    assert "rank 0: watchdog: step 2 has run 11.0 s (limit 10 s)" in err
    assert "test_fires_only_after_timeout_with_injected_clock" in err  # main-thread stack


def test_stack_summary_names_innermost_frames_first() -> None:
    import threading

    def inner_helper() -> str:
        return stack_summary(threading.get_ident(), depth=2)

    text = inner_helper()
    assert text.startswith("stack_summary (watchdog.py:"), text
    assert " <- inner_helper (test_watchdog.py:" in text
    assert stack_summary(None) == ""
    reports = {0: RankState(0, "h", 1, True, "allreduce", 4, 1.0, 3, "sleep (x.py:1)")}
    v = late_ranks(reports, 1)
    assert "main thread in: sleep (x.py:1)" in format_table(reports, 1, 1.0, v)


def test_zero_timeout_turns_it_off() -> None:
    from mpi4py import MPI

    dog = Watchdog.create(MPI.COMM_SELF, 0.0, abort=lambda code: None)
    dog.step_started(1)
    assert dog.deadline is None and not dog._thread.is_alive()
    dog.close()


def test_below_thread_multiple_still_dumps_and_aborts(tmp_path) -> None:
    """A process whose MPI runs at THREAD_SERIALIZED: no MPI from the thread but Abort."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "serialized.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            import mpi4py
            mpi4py.rc.thread_level = "serialized"
            from mpi4py import MPI
            from mpitrain.runtime.watchdog import Watchdog

            def stuck_here():
                time.sleep(20)

            def bye(code):
                sys.stderr.flush()
                os._exit(3)

            dog = Watchdog.create(MPI.COMM_WORLD, 0.3, abort=bye, poll=0.05)
            dog.step_started(5)
            stuck_here()
            """
        )
    )
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert proc.returncode == 3, proc.stderr
    assert "thread level is below MULTIPLE" in proc.stderr
    assert "rank 0: watchdog: step 5 has run" in proc.stderr
    assert "in stuck_here" in proc.stderr


def test_enter_is_cheap() -> None:
    import time

    from mpi4py import MPI

    dog = Watchdog(MPI.COMM_SELF, 10.0)  # thread not started
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        dog.enter("allreduce", 4)
    per_call = (time.perf_counter() - t0) / n
    assert len(dog.ring) == 16 and dog.entered == n
    assert per_call < 2e-6, per_call


def test_io_phase_has_its_own_longer_limit_and_is_named(capfd) -> None:
    """A checkpoint write past the step limit is not a hang; past the I/O limit it is, by name."""
    from mpi4py import MPI

    now = [0.0]
    aborted: list[int] = []
    dog = Watchdog.create(
        MPI.COMM_SELF, 10.0, grace=0.0, clock=lambda: now[0], abort=aborted.append, poll=0.01,
        io_timeout=100.0,
    )
    try:
        with dog.guard("checkpoint save", io=True):
            now[0] = 50.0  # 5x the step limit: a slow save, not a hang
            assert not dog.fired.wait(0.2)
        now[0] = 500.0
        assert not dog.fired.wait(0.2)  # disarmed after the phase
        with dog.guard("opening data", io=True):
            now[0] = 601.0
            assert dog.fired.wait(5)
        dog._thread.join(5)
        assert aborted == [1]
    finally:
        dog.close()
    err = capfd.readouterr().err
    assert "opening data not done within 100 s (--io-timeout)" in err, err
    assert "rank 0: watchdog: opening data has run 101.0 s (limit 100 s)" in err, err
    assert "step not done" not in err


# --- issue 26 item 4: an abort that cannot complete still ends the rank -----------------------

STUCK_ABORT = """
import sys, threading, time
from mpi4py import MPI
from mpitrain.errors import ConfigError
from mpitrain.runtime import abort
from mpitrain.runtime.watchdog import Watchdog

class StuckAbort:
    '''A communicator whose MPI_Abort never returns (its node is cut off from the launcher).'''

    def __init__(self, comm, size=None):
        self.comm, self.size = comm, size

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Get_size(self):
        return self.size or self.comm.Get_size()

    def Dup(self):
        return StuckAbort(self.comm.Dup(), self.size)

    def Abort(self, code):
        sys.stderr.write(f"Abort({code}) called\\n")
        sys.stderr.flush()
        while True:
            time.sleep(1)

class NeverArrives:
    '''The error communicator of a 2-rank job whose other rank never fails.'''

    def Get_size(self):
        return 2

    def Get_rank(self):
        return 1

    def Ibarrier(self):
        return self

    def Test(self):
        return False

path = sys.argv[1]
stuck = StuckAbort(MPI.COMM_SELF, size=2)
if path == "watchdog":
    dog = Watchdog.create(StuckAbort(MPI.COMM_SELF), 0.3, grace=0.1, poll=0.05)
    dog.step_started(1)
    time.sleep(60)
elif path == "excepthook":
    abort.install_excepthook(stuck)
    worker = threading.Thread(target=lambda: 1 / 0, name="loader")
    worker.start()
    worker.join()
    time.sleep(60)
elif path == "config-error":
    abort._end_together(NeverArrives(), stuck, ConfigError("bad lr"), 2, 0.1)
print("not reached: the process should have ended")
"""


@pytest.mark.parametrize(
    ("path", "code"), [("watchdog", 1), ("excepthook", 1), ("config-error", 2)]
)
def test_abort_that_never_returns_still_ends_the_rank(tmp_path, path: str, code: int) -> None:
    """Every abort path ends this rank within EXIT_AFTER_ABORT_S when MPI_Abort hangs.

    Before: the rank stayed in MPI_Abort for ever (the process is killed here at 30 s).
    """
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mpitrain.runtime.abort import EXIT_AFTER_ABORT_S

    script = tmp_path / "stuck_abort.py"
    script.write_text(STUCK_ABORT)
    root = str(Path(__file__).resolve().parents[2])
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), path], cwd=root, capture_output=True, text=True,
        timeout=30, env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert f"Abort({code}) called" in proc.stderr
    assert (
        f"MPI_Abort did not end this process within {EXIT_AFTER_ABORT_S:g} s "
        f"(a peer or the launcher is unreachable); exiting with code {code}"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "not reached" not in proc.stdout
    # start-up (mpi4py import, MPI init) + watchdog timeout and grace + the exit timer
    assert elapsed < EXIT_AFTER_ABORT_S + 12, elapsed

