"""Which model-parallel checkpoint a run resumes from (rank 0's decision, no MPI needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpitrain.checkpoint_parallel import KIND
from mpitrain.checkpoint_shards import FORMAT, MANIFEST
from mpitrain.errors import CheckpointError
from mpitrain.parallel.checkpoint import _decide, finished, step_dir


def fake(directory: Path, step: int, run: str, *, complete: bool = True) -> Path:
    path = step_dir(directory, step)
    path.mkdir(parents=True)
    if complete:
        doc = {"kind": KIND, "format": FORMAT, "step": step, "run_id": run, "files": [],
               "grid": {"tensor": 1, "pipeline": 1, "data": 1}, "rules": [], "meta": {}}
        (path / MANIFEST).write_text(json.dumps(doc))
    return path


def test_resume_choices_and_refusals(tmp_path: Path) -> None:
    assert _decide(tmp_path, None) is None and _decide(tmp_path, "auto") is None
    a = fake(tmp_path, 100, "R")
    b = fake(tmp_path, 200, "R")
    fake(tmp_path, 300, "R", complete=False)  # an unfinished save: skipped
    assert [s for s, _, _ in finished(tmp_path)] == [100, 200]
    assert _decide(tmp_path, "auto") == str(b)
    with pytest.raises(CheckpointError, match=r"holds checkpoints of run R.*HINT"):
        _decide(tmp_path, None)
    # rewinding run R to step 100 while its step 200 is there would prune or overwrite it
    with pytest.raises(CheckpointError, match=r"later checkpoints.*step 200.*HINT"):
        _decide(tmp_path, str(a))
    assert _decide(tmp_path, str(b)) == str(b)
    other = fake(tmp_path / "elsewhere", 100, "R")
    assert _decide(None, str(other)) == str(other)
