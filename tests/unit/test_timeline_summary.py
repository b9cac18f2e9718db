"""`trace summary` on a synthetic 2-rank trace with known overlap and a known straggler.

Per step (times in ms from the step's start), on both ranks: data wait 0-1, forward 1-3,
backward 3-9; bucket 0 (4 MiB) in flight 5-8 (hidden in backward, but for its 0.1 ms launch
call: a rank starting a collective is not computing). The late rank (1 in steps 0 and 2, 0 in
step 1) idles 9-11, so synchronize starts at 9 on the early rank and 11 on the late one;
bucket 1 (1 MiB) launches there and completes for both at 12; optimizer 12-13, step agreement
13-14. Rank 1's clock runs 5 s ahead (its clock fit removes it). Expected per step:
communication 3+3 (early) + 3+1 (late) = 10 ms, exposed 0.1+3 + 0.1+1 = 4.2 ms, hidden 58%,
data wait 2/28, last rank the late one, late by 2 ms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.cli import main as cli_main
from mpitrain.timeline.chrome import chrome_events, write_merged
from mpitrain.timeline.clock import ClockFit, ClockSample
from mpitrain.timeline.recorder import NULL, Recorder
from mpitrain.timeline.summary import format_summary, load, problems, summarize

MS = 1_000_000
LATE = {0: 1, 1: 0, 2: 1}
SKEW = {0: 0, 1: 5_000 * MS}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def record_rank(rank: int) -> Recorder:
    clock = FakeClock()
    rec = Recorder(steps=(0, 3), clock=clock)

    def at(ms: float) -> None:
        clock.t = SKEW[rank] + int(ms * MS)

    for step in range(3):
        base = 100.0 * step
        late = LATE[step] == rank
        at(base)
        rec.step_begin(step)
        for name, cat, a, b in (("data wait", "data", 0, 1), ("forward", "compute", 1, 3)):
            at(base + a)
            t0 = rec.now()
            at(base + b)
            rec.span(name, t0, cat=cat)
        at(base + 3)
        t_bwd = rec.now()
        at(base + 5)
        t0 = rec.now()
        at(base + 5.1)
        rec.bucket_launched(0, 4 * 2**20, t0)
        at(base + 8)
        rec.bucket_done(0)
        at(base + 9)
        rec.span("backward", t_bwd)
        sync = base + (11 if late else 9)
        at(sync)
        t_sync = rec.now()
        at(sync + 0.1)
        rec.bucket_launched(1, 2**20, t_sync)
        t_wait = rec.now()
        at(base + 12)
        rec.bucket_waited(1, t_wait)
        rec.span("synchronize", t_sync, cat="sync")
        for name, cat, a, b in (("optimizer", "compute", 12, 13), ("agree", "agree", 13, 14)):
            at(base + a)
            t0 = rec.now()
            at(base + b)
            rec.span(name, t0, cat=cat)
        rec.step_end()
    return rec


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    gathered = []
    for rank in (0, 1):
        rec = record_rank(rank)
        fit = ClockFit(ClockSample(0, SKEW[rank], 2000), ClockSample(10**12, SKEW[rank], 4000))
        gathered.append((chrome_events(rec, fit, rank, 0.0), {"rank": rank, "bound_ns": 2000}))
    path = tmp_path / "trace.json"
    write_merged(path, gathered, (0, 3))
    return path


def test_summary_reports_known_overlap_and_straggler(trace: Path) -> None:
    doc = load(trace)
    assert problems(doc) == []
    s = summarize(doc, path=str(trace), peak_gbs=2.0)
    assert s.ranks == 2 and [r.step for r in s.steps] == [0, 1, 2]
    for r in s.steps:
        assert r.time == pytest.approx(14.0)
        assert r.comm == pytest.approx(10.0)
        assert r.exposed == pytest.approx(4.2)
        assert r.hidden_frac == pytest.approx(0.58)
        assert r.data_share == pytest.approx(2 / 28)
        assert r.last_rank == LATE[r.step]
        assert r.late_by == pytest.approx(2.0)
    assert s.comm_ms == pytest.approx(30.0) and s.exposed_ms == pytest.approx(12.6)
    assert s.hidden_frac == pytest.approx(0.58) and s.data_share == pytest.approx(1 / 14)
    assert s.step_ms == pytest.approx(14.0)
    assert s.last_counts == {0: 1, 1: 2}
    assert s.clock_bound_ms == pytest.approx(0.002)
    b0, b1 = s.buckets
    assert (b0.bytes, b0.flights, b1.bytes, b1.flights) == (4 * 2**20, 6, 2**20, 6)
    assert b0.median_ms == pytest.approx(3.0) and b1.median_ms == pytest.approx(2.0)
    assert b0.algbw_gbs == pytest.approx(4 * 2**20 / 3e-3 / 1e9)
    assert b0.busbw_gbs == pytest.approx(b0.algbw_gbs)  # 2(n-1)/n = 1 for n = 2
    assert b1.of_peak == pytest.approx(2**20 / 2e-3 / 1e9 / 2.0)
    text = format_summary(s)
    assert "rank 0 last in 1/3, rank 1 last in 2/3" in text
    assert "hidden 58.0%" in text
    short = format_summary(s, max_rows=2)
    assert "... 1 more steps" in short and "\n     1 " not in short


def test_trace_command(trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.json"
    assert cli_main(["trace", "summary", str(trace), "--json", str(out)]) == 0
    assert "stragglers (last into synchronize)" in capsys.readouterr().out
    assert json.loads(out.read_text())["last_counts"] == {"0": 1, "1": 2}
    bad = tmp_path / "bad.json"
    bad.write_text('{"traceEvents": []}')
    assert cli_main(["trace", "summary", str(bad)]) != 0
    assert "not an mpitrain timeline" in capsys.readouterr().err


def test_trace_plot(trace: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "step.png"
    assert cli_main(["trace", "plot", str(trace), "--out", str(png), "--step", "1"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["trace", "plot", str(trace), "--out", str(png), "--step", "7"]) != 0


def record_flights() -> Recorder:
    """One rank, two steps of ZeRO/double-buffer-like traffic (ms from the step's start):
    data wait 0-1; forward 1-5 with a prefetched all-gather (launch 1-1.1, in flight to 3,
    hidden) and a second one waited on (launch 3-3.1, wait 3.1-4: exposed); synchronize 5-6
    with a blocking 8-byte all-reduce; optimizer 6-8 starting an all-reduce that stays in
    flight into the next step's forward (observed done at 2 there; the last at 15, after
    step 1 ended). Per step: communication 1-4, 5-9 (and 0-2 of the previous all-reduce in
    step 1): 7 and 8 ms; hidden 1.1-3 and 6.1-8: 3.8 ms each."""
    clock = FakeClock()
    rec = Recorder(steps=(0, 2), clock=clock)
    rec.note("the servers (rank 2) record nothing")

    def at(ms: float) -> int:
        clock.t = int(ms * MS)
        return clock.t

    carried = -1
    for step in range(2):
        base = 100.0 * step
        rec.step_begin(step, at(base))
        t0 = at(base)
        at(base + 1)
        rec.span("data wait", t0, cat="data")
        t_fwd = at(base + 1)
        at(base + 1.1)
        prefetch = rec.comm_started("all-gather b1", 1000, t_fwd, "all-gather")
        if carried >= 0:
            at(base + 2)
            rec.comm_done(carried)
        at(base + 3)
        rec.comm_done(prefetch)
        t0 = at(base + 3)
        at(base + 3.1)
        gather = rec.comm_started("all-gather b2", 2000, t0, "all-gather")
        t_wait = rec.now()
        at(base + 4)
        rec.comm_waited(gather, t_wait)
        at(base + 5)
        rec.span("forward", t_fwd)
        t_sync = rec.now()
        at(base + 6)
        rec.comm_blocking("allreduce grad norm", 8, t_sync, "allreduce")
        rec.span("synchronize", t_sync, cat="sync")
        t_opt = rec.now()
        at(base + 6.1)
        carried = rec.comm_started("allreduce gradients", 4000, t_opt, "allreduce")
        at(base + 8)
        rec.span("optimizer", t_opt)
        at(base + 9)
        rec.step_end()
    at(115)
    rec.comm_done(carried)
    return rec


def test_named_flights_count_as_communication_and_waits_are_not_compute(tmp_path: Path) -> None:
    rec = record_flights()
    fit = ClockFit(ClockSample(0, 0, 2000))
    path = tmp_path / "flights.json"
    write_merged(path, [(chrome_events(rec, fit, 0, 0.0), {"rank": 0, "notes": rec.notes})],
                 (0, 2))
    doc = load(path)
    assert problems(doc) == []
    s = summarize(doc)
    assert [r.comm for r in s.steps] == [pytest.approx(7.0), pytest.approx(8.0)]
    assert [r.exposed for r in s.steps] == [pytest.approx(3.2), pytest.approx(4.2)]
    assert s.hidden_frac == pytest.approx(7.6 / 15)
    rows = {c.name: c for c in s.collectives}
    assert list(rows) == ["all-gather b1", "all-gather b2", "allreduce grad norm",
                          "allreduce gradients"]
    assert (rows["all-gather b2"].bytes, rows["all-gather b2"].flights) == (2000, 2)
    assert rows["all-gather b2"].median_ms == pytest.approx(1.0)
    assert rows["allreduce gradients"].op == "allreduce"
    assert rows["allreduce gradients"].median_ms == pytest.approx((96 + 9) / 2)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert {"steps", "all-gather b1", "all-gather b2", "allreduce gradients"} <= names
    text = format_summary(s)
    assert "communication 15.000 ms" in text and "0.000 ms" not in text.split("overall")[1]
    assert "not recorded: the servers (rank 2) record nothing" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("  all-gather b2 "))
    assert row.split()[2:5] == ["all-gather", "2000", "2"], row
    assert s.data_share == pytest.approx(2 / 18)


def test_concurrent_flights_of_one_name_get_their_own_lanes() -> None:
    clock = FakeClock()
    rec = Recorder(clock=clock)
    rec.step_begin(0)
    a = rec.comm_started("push s0", 10, rec.now(), "send")
    b = rec.comm_started("push s0", 10, rec.now(), "send")
    clock.t = 5
    rec.comm_done(a)
    c = rec.comm_started("push s0", 10, rec.now(), "send")  # reuses the first lane
    rec.comm_done(b)
    rec.comm_done(c)
    lanes = [e.tid for e in rec.events if e.cat == "comm"]
    assert lanes[0] != lanes[1] and lanes[2] == lanes[0]
    assert sorted(rec.track_names.values()) == ["push s0", "push s0 (2)"]
    assert rec.flights() == [] and NULL.comm_started("x", 1, 0, "send") == -1


def test_an_empty_window_says_no_step_was_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    rec = Recorder(steps=(100, 200), clock=clock)
    for step in range(5):  # the run stops long before the window opens
        rec.step_begin(step)
        clock.t += MS
        rec.span("forward", rec.now())
    rec.step_end()
    path = tmp_path / "empty.json"
    write_merged(path, [(chrome_events(rec, ClockFit(ClockSample(0, 0, 0)), 0, 0.0),
                         {"rank": 0})], (100, 200))
    assert cli_main(["trace", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no step was recorded" in out and "--timeline-steps 100:200" in out
    assert "communication" not in out and "hidden" not in out
    # steps, but no communication among them (one rank): said in words, not as 0.000 ms
    rec = Recorder(steps=(0, 2), clock=clock)
    for step in range(2):
        rec.step_begin(step)
        clock.t += MS
    rec.step_end()
    write_merged(path, [(chrome_events(rec, ClockFit(ClockSample(0, 0, 0)), 0, 0.0),
                         {"rank": 0})], (0, 2))
    text = format_summary(summarize(load(path)))
    assert "no communication was recorded in these steps" in text, text
    assert "communication 0.000" not in text


def _span(rank: int, cat: str, ts: float, dur: float, name: str = "",
          **args: object) -> dict[str, object]:
    return {"ph": "X", "pid": rank, "tid": 0, "ts": ts, "dur": dur, "cat": cat,
            "name": name or cat, "args": args}


def test_pipeline_bubble_is_reported_per_stage() -> None:
    """Blocking receives of a pipeline stage ("bubble" spans with args.stage): each stage's
    share of its steps, median and worst; a trace without a pipeline reports none."""
    span = _span
    events = []
    for step, t in enumerate((0.0, 10_000.0)):  # two steps of 10 ms (ts in microseconds)
        for rank in (0, 1):
            events.append(span(rank, "step", t, 10_000.0, step=step))
        # stage 0 waits 2 ms in step 0 and 4 ms in step 1; stage 1 waits 5 ms each step,
        # in two overlapping receives (counted once)
        events.append(span(0, "bubble", t + 1000, 2000.0 * (step + 1), step=step, stage=0))
        events.append(span(1, "bubble", t, 4000.0, step=step, stage=1))
        events.append(span(1, "bubble", t + 3000, 2000.0, step=step, stage=1))
    doc = {"otherData": {"ranks": 2}, "traceEvents": events}
    s = summarize(doc)
    got = {b.stage: (round(b.median, 3), round(b.worst, 3)) for b in s.stages}
    assert got == {0: (0.3, 0.4), 1: (0.5, 0.5)}, got
    assert all(r.tensor_ms == r.p2p_ms == r.p2p_bytes == 0 for r in s.stages)
    lines = format_summary(s).splitlines()
    head = lines.index(next(x for x in lines if "model parallelism per stage" in x))
    assert lines[head + 2].split()[:4] == ["0", "2", "30.0", "40.0"], lines[head:]
    assert lines[head + 3].split()[:4] == ["1", "2", "50.0", "50.0"], lines[head:]
    plain = summarize({"otherData": {"ranks": 1},
                       "traceEvents": [span(0, "step", 0.0, 10.0, step=0)]})
    assert plain.stages == [] and "model parallelism" not in format_summary(plain)


def test_tensor_parallel_and_send_recv_time_per_stage() -> None:
    """Per stage beside the bubble: the time in tensor-group flights (args.group "tensor")
    and in sends and receives (op send/recv; a receive nested in the bubble counts in both),
    as the median over the stage's rank-steps of the union inside each step, clipped to it;
    and the bytes the step's sends and receives moved. A rank with tensor-parallel flights
    but no stage (no pipeline) is stage 0."""
    span = _span
    tp = {"op": "allreduce", "group": "tensor", "ranks": 2}

    def p2p(rank: int, op: str, ts: float, dur: float, step: int, nbytes: int
            ) -> dict[str, object]:
        return span(rank, "comm", ts, dur, f"{op} x", step=step, bytes=nbytes, op=op,
                    group="pipeline", peer=1 - rank, stage=rank)

    events = []
    for step, t in enumerate((0.0, 10_000.0)):
        for rank in (0, 1):
            events.append(span(rank, "step", t, 10_000.0, step=step))
        # stage 0: tensor 1 + 0.5 ms; a 1 ms receive inside its bubble, a 3 ms send: 4 ms
        events.append(span(0, "bubble", t + 1000, 2000.0, step=step, stage=0))
        events.append(span(0, "comm", t + 100, 1000.0, "tp all-reduce fwd", step=step,
                           bytes=64, **tp))
        events.append(span(0, "comm", t + 5000, 500.0, "tp all-reduce bwd", step=step,
                           bytes=64, **tp))
        events.append(p2p(0, "recv", t + 1000, 1000.0, step, 100))
        events.append(p2p(0, "send", t + 3000, 3000.0, step, 100))
        # stage 1: tensor 2 ms, of which 1 ms past the last step's end (clipped there);
        # a 4 ms receive and a send overlapping it by 1 ms: 5 ms; ZeRO's flights are not
        # tensor-parallel
        events.append(span(1, "bubble", t, 4000.0, step=step, stage=1))
        events.append(span(1, "comm", t + 9000, 2000.0, "tp all-reduce fwd", step=step,
                           bytes=64, **tp))
        events.append(span(1, "comm", t + 6000, 2000.0, "all-gather b0", step=step,
                           bytes=64, op="all-gather"))
        events.append(p2p(1, "recv", t, 4000.0, step, 50))
        events.append(p2p(1, "send", t + 3000, 2000.0, step, 50))
    s = summarize({"otherData": {"ranks": 2}, "traceEvents": events})
    got = {r.stage: (r.samples, round(r.tensor_ms, 3), round(r.tensor_share, 3),
                     round(r.p2p_ms, 3), round(r.p2p_share, 3), r.p2p_bytes) for r in s.stages}
    # stage 1's tensor time: 1 ms (clipped) + 1 ms spilled from step 0 into step 1 = 1 | 2
    assert got == {0: (2, 1.5, 0.15, 4.0, 0.4, 200), 1: (2, 1.5, 0.15, 5.0, 0.5, 100)}, got
    rows = {r.name: r for r in s.collectives}
    assert rows["tp all-reduce fwd"].busbw_gbs == rows["tp all-reduce fwd"].algbw_gbs  # 2 ranks
    lines = format_summary(s).splitlines()
    head = lines.index(next(x for x in lines if "tensor-parallel ms" in x))
    assert lines[head].split()[-8:] == ["tensor-parallel", "ms", "%", "send/recv", "ms", "%",
                                        "send/recv", "bytes"], lines[head]
    assert lines[head + 1].split() == ["0", "2", "20.0", "20.0", "1.500", "15.0", "4.000",
                                       "40.0", "200"], lines[head + 1]
    only_tp = summarize({"otherData": {"ranks": 1}, "traceEvents": [
        span(0, "step", 0.0, 10_000.0, step=0),
        span(0, "comm", 0.0, 1000.0, "tp all-reduce fwd", step=0, bytes=64, **tp)]})
    assert [(r.stage, r.median, r.tensor_ms, r.p2p_ms) for r in only_tp.stages] == [
        (0, 0.0, 1.0, 0.0)]


def test_grid_buckets_use_their_group_and_stay_apart(tmp_path: Path) -> None:
    """A grid's replicas reduce over their data-parallel group (2 of 4 ranks) and each stage
    has its own bucket 0: bus bandwidth over the group, one row per (bucket, size)."""
    gathered = []
    for rank in range(4):
        clock = FakeClock()
        rec = Recorder(steps=(0, 1), clock=clock)
        rec.step_begin(0)
        nbytes = 4 * 2**20 if rank < 2 else 2 * 2**20  # stage 0 / stage 1
        rec.bucket_launched(0, nbytes, rec.now(), ranks=2)
        clock.t = 4 * MS
        rec.bucket_done(0)
        clock.t = 5 * MS
        rec.step_end()
        fit = ClockFit(ClockSample(0, 0, 2000), ClockSample(10**12, 0, 4000))
        gathered.append((chrome_events(rec, fit, rank, 0.0), {"rank": rank, "bound_ns": 2000}))
    path = tmp_path / "grid.json"
    write_merged(path, gathered, (0, 1))
    s = summarize(load(path), path=str(path))
    assert [(r.bucket, r.bytes, r.flights) for r in s.buckets] == [
        (0, 2 * 2**20, 2), (0, 4 * 2**20, 2)]
    for r in s.buckets:  # 2 ranks: bus bandwidth == algorithm bandwidth (4 ranks: 1.5x)
        assert r.busbw_gbs == pytest.approx(r.algbw_gbs)
        assert r.algbw_gbs == pytest.approx(r.bytes / 4e-3 / 1e9)
