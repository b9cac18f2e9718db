"""Serial tests of the timeline recorder, the Chrome writer and the engine's bucket spans."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpitrain.comm.handle import Handle
from mpitrain.grad.engine import GradEngine
from mpitrain.grad.hooks import HookState, allreduce_hook
from mpitrain.timeline import NULL, Recorder, parse_steps, start
from mpitrain.timeline.chrome import chrome_events, write_merged
from mpitrain.timeline.clock import ClockFit, ClockSample
from mpitrain.timeline.recorder import MAIN, bucket_track
from mpitrain.timeline.summary import load, problems


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def test_parse_steps() -> None:
    assert parse_steps("10:20") == (10, 20)
    assert parse_steps(":5") == (0, 5)
    assert parse_steps("3:")[0] == 3  # type: ignore[index]
    assert parse_steps(None) is None and parse_steps(":") is None
    for bad in ("5", "a:b", "5:5", "-1:3"):
        with pytest.raises(ValueError, match="timeline steps"):
            parse_steps(bad)


def test_window_and_ring_buffer_bound_a_long_run() -> None:
    clock = FakeClock()
    rec = Recorder(steps=(10, 20), capacity=10_000, clock=clock)
    for step in range(20_000):
        rec.step_begin(step)
        t0 = rec.now()
        clock.t += 1000
        rec.span("forward", t0)
        rec.bucket_launched(0, 64, rec.now())
        clock.t += 1000
        rec.bucket_done(0)
    rec.step_end()
    assert {e.step for e in rec.events} == set(range(10, 20))
    assert len(rec.events) == 10 * 4 and rec.dropped == 0
    ring = Recorder(steps=None, capacity=500, clock=clock)
    for step in range(20_000):
        ring.step_begin(step)
        ring.span("forward", ring.now())
    ring.step_end()
    assert len(ring.events) == 500 and ring.dropped == 2 * 20_000 - 500
    assert ring.events[-1].step == 19_999  # the newest are kept


def test_null_recorder_is_off_and_silent() -> None:
    assert NULL.on is False
    NULL.step_begin(3)
    NULL.span("x", NULL.now())
    NULL.bucket_launched(0, 1, 0)
    NULL.bucket_done(0)
    NULL.bucket_waited(0, 0)
    session = start(MPI.COMM_SELF, None)
    assert session.recorder is NULL and not session.active and session.stop() is None


def _engine() -> tuple[GradEngine, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))

    class Slow:
        """A 1-rank reducer whose handles complete on the second test() (in flight once)."""

        size = 1

        def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
            return SlowHandle()

        def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
            pass

    class SlowHandle:
        def __init__(self) -> None:
            self.tests = 0

        def wait(self) -> None:
            time.sleep(0.001)

        def test(self) -> bool:
            self.tests += 1
            return self.tests > 1

    eng = GradEngine(list(model.named_parameters()), hook=allreduce_hook,
                     state=HookState(Slow()), bucket_mb=0.01)  # type: ignore[arg-type]
    return eng, model


def test_engine_records_every_bucket_launch_and_completion(tmp_path: Path) -> None:
    eng, model = _engine()
    rec = Recorder(steps=(1, 3))
    eng.timeline = rec
    for step in range(4):
        rec.step_begin(step)
        model(torch.randn(4, 8)).sum().backward()
        t0 = rec.now()
        eng.synchronize()
        rec.span("synchronize", t0, cat="sync")
    rec.step_end()
    n = len(eng.buckets)
    assert n >= 3
    for step in (1, 2):
        evs = [e for e in rec.events if e.step == step]
        launches = sorted(e.tid for e in evs if e.cat == "launch")
        flights = sorted(e.tid for e in evs if e.cat == "bucket")
        assert launches == flights == [bucket_track(b) for b in range(n)]
        assert any(e.cat == "wait" and e.tid == MAIN for e in evs)  # the last bucket waited
    assert {e.step for e in rec.events} == {1, 2}
    fit = ClockFit(ClockSample(0, 0, 0))
    path = tmp_path / "t.json"
    write_merged(path, [(chrome_events(rec, fit, 0, 0.0), {"rank": 0})], rec.steps)
    doc = load(path)
    assert problems(doc) == []
    eng.timeline = NULL  # switched off: no more events
    before = rec.recorded
    model(torch.randn(4, 8)).sum().backward()
    eng.synchronize()
    assert rec.recorded == before


def test_flights_carry_the_callers_args() -> None:
    """comm_started / comm_blocking add ``args`` (group, peer, stage) to the flight's span
    beside bytes and op; off (the null recorder, or outside the window) nothing is kept."""
    clock = FakeClock()
    rec = Recorder(steps=(1, 2), clock=clock)
    rec.step_begin(0)
    assert rec.comm_started("send x", 8, 0, "send", {"peer": 1}) == -1
    rec.comm_blocking("recv x", 8, 0, "recv", {"peer": 1})
    assert NULL.comm_started("send x", 8, 0, "send", {"peer": 1}) == -1
    NULL.comm_blocking("recv x", 8, 0, "recv", {"peer": 1})
    assert not rec.events
    rec.step_begin(1)
    t0 = clock.t = 10
    clock.t = 12
    key = rec.comm_started("send activation to stage 1", 64, t0, "send",
                           {"group": "pipeline", "peer": 1, "stage": 0})
    clock.t = 20
    rec.comm_blocking("tp all-reduce fwd", 32, 15, "allreduce",
                      {"group": "tensor", "ranks": 2})
    clock.t = 30
    rec.comm_done(key)
    rec.step_end()
    flights = {e.name: e for e in rec.events if e.cat == "comm"}
    assert flights["send activation to stage 1"].args == {
        "bytes": 64, "op": "send", "group": "pipeline", "peer": 1, "stage": 0}
    assert (flights["send activation to stage 1"].t0, flights["send activation to stage 1"].t1
            ) == (10, 30)
    assert flights["tp all-reduce fwd"].args == {"bytes": 32, "op": "allreduce",
                                                 "group": "tensor", "ranks": 2}
    assert [e.name for e in rec.events if e.cat == "wait"] == ["wait tp all-reduce fwd"]


def test_problems_catch_broken_traces() -> None:
    def x(name: str, cat: str, ts: float, dur: float, tid: int = 0) -> dict[str, object]:
        return {"ph": "X", "name": name, "cat": cat, "pid": 0, "tid": tid, "ts": ts, "dur": dur,
                "args": {"step": 0}}

    ok = {"traceEvents": [x("step", "step", 0, 10), x("forward", "compute", 1, 2),
                          x("launch", "launch", 3, 1, 1), x("allreduce", "bucket", 3, 5, 1)]}
    assert problems(ok) == []
    crossing = {"traceEvents": [x("step", "step", 0, 10), x("forward", "compute", 8, 5)]}
    assert "without nesting" in problems(crossing)[0]
    lost = {"traceEvents": [x("launch", "launch", 3, 1, 1)]}
    assert "never completed" in problems(lost)[0]


def test_start_stop_on_one_rank_writes_chrome_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trace.json"
    session = start(MPI.COMM_SELF, path, steps=(0, 2))
    rec = session.recorder
    for step in range(3):
        rec.step_begin(step)
        rec.span("forward", rec.now())
    assert session.stop() == path
    assert session.stop() is None  # once
    doc = json.loads(path.read_text())
    assert doc["otherData"]["format"] == "mpitrain-timeline/1"
    names = [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"]
    assert names.count("step") == 2 and names.count("forward") == 2
    assert not list(path.parent.glob(".*.tmp"))


def test_clock_fit_corrects_drift_only_when_it_is_measurable() -> None:
    s = ClockSample(local_ns=0, offset_ns=1_000_000, rtt_ns=10_000)
    drifting = ClockFit(s, ClockSample(local_ns=10**9, offset_ns=6_000_000, rtt_ns=20_000))
    assert drifting.drifts and drifting.drift_ppm == pytest.approx(5000)
    assert drifting.align(5 * 10**8) == pytest.approx(5 * 10**8 - 3_500_000)
    assert drifting.bound_ns == 10_000
    # a 2 ms change measured with 4 ms round trips is noise: keep the better sample's offset
    noisy = ClockFit(ClockSample(0, 1_000_000, 4_000_000),
                     ClockSample(10**9, 3_000_000, 5_000_000))
    assert not noisy.drifts and noisy.drift_ppm == 0.0
    assert noisy.offset_at(10**9) == 1_000_000 and noisy.bound_ns == 2_000_000
    assert ClockFit(s).align(7) == 7 - 1_000_000


def test_step_begins_at_a_given_time_and_bad_windows_are_config_errors(tmp_path: Path) -> None:
    from mpitrain.errors import ConfigError
    from mpitrain.timeline import start_timeline

    clock = FakeClock()
    rec = Recorder(steps=(0, 1), clock=clock)
    clock.t = 500
    rec.step_begin(0, t0=123)  # the trainer starts the step before fetching its batches
    rec.step_end()
    assert (rec.events[0].name, rec.events[0].t0, rec.events[0].t1) == ("step", 123, 500)
    with pytest.raises(ConfigError, match=r"need 0 <= A < B.*HINT"):
        start_timeline(MPI.COMM_SELF, str(tmp_path / "t.json"), "9:3")
    assert start_timeline(MPI.COMM_SELF, None, "9:3").recorder is NULL  # off: not even parsed


def test_communication_thread_spans_on_their_own_track() -> None:
    """A communication thread records each operation's queue wait and run (issue 24)."""
    from mpitrain.runtime.comm_thread import CommThread

    rec = Recorder(steps=(0, 10))
    rec.step_begin(0)
    thread = CommThread(0, "gradients")
    thread.timeline = rec
    gate = threading.Event()
    first = thread.submit(gate.wait, "allreduce 64 B")
    second = thread.submit(lambda: None, "allreduce 32 B")
    gate.set()
    first.wait()
    second.wait()
    thread.close()
    spans = [e for e in rec.events if e.cat == "thread"]
    assert [e.name for e in spans] == ["queued: allreduce 64 B", "allreduce 64 B",
                                       "queued: allreduce 32 B", "allreduce 32 B"]
    assert len({e.tid for e in spans}) == 1
    assert rec.track_names[spans[0].tid] == "comm thread gradients"
    assert all(e.t0 <= e.t1 for e in spans)
    assert spans[3].t0 >= spans[1].t1  # in submission order, one at a time
