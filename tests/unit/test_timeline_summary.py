"""`trace summary` on a synthetic 2-rank trace with known overlap and a known straggler.

Per step (times in ms from the step's start), on both ranks: data wait 0-1, forward 1-3,
backward 3-9; bucket 0 (4 MiB) in flight 5-8 (hidden in backward). The late rank (1 in steps
0 and 2, 0 in step 1) idles 9-11, so synchronize starts at 9 on the early rank and 11 on the
late one; bucket 1 (1 MiB) launches there and completes for both at 12; optimizer 12-13, step
agreement 13-14. Rank 1's clock runs 5 s ahead (its clock fit removes it). Expected per step:
communication 3+3 (early) + 3+1 (late) = 10 ms, exposed 3+1 = 4 ms, hidden 60%, data
wait 2/28, last rank the late one, late by 2 ms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.cli import main as cli_main
from mpitrain.timeline.chrome import chrome_events, write_merged
from mpitrain.timeline.clock import ClockFit, ClockSample
from mpitrain.timeline.recorder import Recorder
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
        assert r.exposed == pytest.approx(4.0)
        assert r.hidden_frac == pytest.approx(0.6)
        assert r.data_share == pytest.approx(2 / 28)
        assert r.last_rank == LATE[r.step]
        assert r.late_by == pytest.approx(2.0)
    assert s.comm_ms == pytest.approx(30.0) and s.exposed_ms == pytest.approx(12.0)
    assert s.hidden_frac == pytest.approx(0.6) and s.data_share == pytest.approx(1 / 14)
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
    assert "hidden 60.0%" in text
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
