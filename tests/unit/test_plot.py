"""`mpitrain plot`: PNGs from metrics.jsonl, overlay of runs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.train.plot import load_run, main


def _run_dir(path: Path, steps: int = 40, torn: bool = False) -> Path:
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append(
            {
                "step": s,
                "epoch": 1 + s // 20,
                "loss": 2.0 / s,
                "lr": 0.1,
                "samples_per_sec": 1000.0 + s,
                "data_wait_frac": 0.1,
                "comm_frac": 0.3,
                "time": 0.01 * s,
                "wall": 0.02 * s,
            }
        )
        if s % 20 == 0:
            lines.append(
                {
                    "kind": "eval",
                    "epoch": s // 20,
                    "step": s,
                    "test_loss": 1.0 / s,
                    "test_accuracy": 0.5 + s / 100,
                    "train_loss": 1.0,
                    "train_accuracy": 0.6,
                }
            )
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (path / "metrics.jsonl").write_text(text + ('{"step": 41, "lo' if torn else ""))
    return path


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_single_run_writes_three_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run", torn=True)
    assert main([str(run)]) == 0
    for name in ("loss", "accuracy", "throughput"):
        assert _is_png(run / "plots" / f"{name}.png")
    assert "loss.png" in capsys.readouterr().out
    loaded = load_run(run)
    assert len(loaded.train) == 40 and len(loaded.evals) == 2  # torn last line skipped


@pytest.mark.parametrize("axis", ["time", "wall"])
def test_overlay_two_runs_by_time(tmp_path: Path, axis: str) -> None:
    from mpitrain.train.plot import _x

    a, b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b", steps=20)
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out), "--x", axis]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "loss.png", "throughput.png"]
    run = load_run(a)
    per_step = 0.01 if axis == "time" else 0.02  # eval lines take their step's clock
    assert _x(run, run.evals, axis) == pytest.approx([20 * per_step, 40 * per_step])


def test_missing_metrics_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl' does not exist" in err and "HINT: pass the --run-dir" in err


def test_garbage_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2}\n')
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err
