"""sweep-summary: ranks finished tasks best first, shows the swept keys, lists unfinished ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.slurm import sweep


def write(d: Path, name: str, acc: float | None, loss: float, **cfg: object) -> None:
    (d / name).mkdir(parents=True)
    summary = {
        "test_accuracy": acc,
        "final_loss": loss,
        "wall_seconds": 1.5,
        "config": {"epochs": 3, "run_dir": str(d / name), **cfg},
    }
    (d / name / "summary.json").write_text(json.dumps(summary))


def test_best_first_with_swept_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "task-0", 0.90, 0.3, lr=0.1, seed=1)
    write(tmp_path, "task-1", 0.97, 0.1, lr=0.05, seed=1)
    write(tmp_path, "task-2", 0.95, 0.2, lr=0.02, seed=1)
    write(tmp_path, "task-3", None, 0.05, lr=0.01, seed=1)
    (tmp_path / "task-4").mkdir()
    out_json = tmp_path / "ranked.json"
    assert sweep.main([str(tmp_path), "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "task", "test_accuracy", "final_loss", "wall_s", "lr"]
    assert [line.split()[1] for line in lines[1:5]] == ["task-1", "task-2", "task-0", "task-3"]
    assert lines[1].split()[-1] == "0.05"
    assert lines[5] == "task-4: no summary.json (still running, failed or preempted)"
    ranked = json.loads(out_json.read_text())
    assert [r["task"] for r in ranked] == ["task-1", "task-2", "task-0", "task-3"]


def test_loss_metric_sorts_ascending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a", 0.9, 0.3)
    write(tmp_path, "b", 0.8, 0.1)
    assert sweep.main([str(tmp_path), "--metric", "final_loss"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[1] for r in rows] == ["b", "a"]


def test_empty_or_missing_dir(tmp_path: Path) -> None:
    assert sweep.main([str(tmp_path)]) == 1
    assert sweep.main([str(tmp_path / "nope")]) == 2
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "summary.json").write_text("{not json")
    assert sweep.main([str(tmp_path)]) == 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[1, 2]", "not a JSON object"),
        (b'"done"', "not a JSON object"),
        (b'{"test_accuracy": 0.5, "config": [1]}', "'config'"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "unreadable"),
        (b"[" * 100000 + b"]" * 100000, "unreadable"),
    ],
)
def test_malformed_summary_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, needle: str
) -> None:
    write(tmp_path, "task-0", 0.9, 0.3, lr=0.1)
    (tmp_path / "task-1").mkdir()
    (tmp_path / "task-1" / "summary.json").write_bytes(content)
    assert sweep.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HINT: " in err and needle in err, err
    assert "task-1" in err


def test_unwritable_json_output_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "task-0", 0.9, 0.3, lr=0.1)
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "ranked.json"  # refused before the table is printed
    assert sweep.main([str(tmp_path), "--json", str(out)]) == 2
    err = capsys.readouterr()
    assert "not a directory" in err.err and "ranked.json" in err.err and err.out == ""
