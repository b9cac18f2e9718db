"""Checkpoints belong to a run: a reused --checkpoint-dir never loses or mixes another run's files.

The end-to-end cases run the train command in this process on ``MPI.COMM_SELF`` (one rank, the
digits demo, a few steps); the rest exercise :mod:`mpitrain.checkpoint` directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mpi4py import MPI

from mpitrain.checkpoint import files as ckpt
from mpitrain.errors import CheckpointError, ConfigError

MODELS = "tests.mpi.scenarios.train_models"
COMMON = ["--epochs", "1", "--no-progress", "--batch-size", "16"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def module_env(cache: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        import os

        for name in [n for n in os.environ if n.startswith("MPITRAIN_")]:
            mp.delenv(name)
        mp.setenv("MPITRAIN_CACHE", str(cache))
        mp.setenv("TEST_RANK", "0")
        yield


def _train(argv: list[str]) -> int:
    from mpitrain.train.run import main

    return int(main([*COMMON, *argv], MPI.COMM_SELF))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def run_a(module_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 8 steps, a checkpoint after each: steps 6, 7, 8 are kept."""
    d = tmp_path_factory.mktemp("run-a") / "ckpt"
    assert _train(["--max-steps", "8", "--checkpoint-every", "1", "--checkpoint-dir", str(d)]) == 0
    return d


@pytest.fixture()
def used_dir(run_a: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(run_a, d)
    return d


def test_fresh_run_in_directory_of_another_run_is_refused(used_dir: Path) -> None:
    before = _files(used_dir)
    with pytest.raises(ConfigError) as info:
        _train(["--max-steps", "2", "--checkpoint-every", "1", "--checkpoint-dir", str(used_dir)])
    msg = str(info.value)
    other = ckpt.read_info(used_dir / "step-000000008.pt")
    assert other.run_id is not None and other.saved_at is not None
    assert "\n" not in msg, msg
    assert f"'{used_dir}'" in msg and f"run {other.run_id}" in msg, msg
    assert "step 8" in msg and other.saved_at in msg, msg
    assert "HINT" in msg and "--resume auto" in msg and "new --checkpoint-dir" in msg, msg
    assert _files(used_dir) == before  # nothing written, pruned or re-pointed


def test_resume_auto_says_which_checkpoint_and_keeps_the_run_id(
    used_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    newest = ckpt.read_info(used_dir / "step-000000008.pt")
    capsys.readouterr()
    args = ["--max-steps", "10", "--checkpoint-every", "1", "--checkpoint-dir", str(used_dir)]
    assert _train([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "resumed from" in ln)
    assert str(newest.path) in line and "step 8" in line, line
    assert f"run {newest.run_id}" in line and f"saved {newest.saved_at}" in line, line
    # the continued run's saves carry the same id, in the sidecar and in the checkpoint
    assert [p.name for p in ckpt.list_checkpoints(used_dir)] == [
        "step-000000010.pt", "step-000000009.pt", "step-000000008.pt"
    ]
    for step in (9, 10):
        info = ckpt.read_info(ckpt.checkpoint_path(used_dir, step))
        state = ckpt.load(info.path)
        assert info.run_id == state["run_id"] == newest.run_id
        assert state["format"] == 2 and state["step"] == step
        assert info.saved_at == state["saved_at"]
    assert (used_dir / "latest").read_text().strip() == "step-000000010.pt"


def _to_format_1(d: Path) -> None:
    """Rewrite every checkpoint in ``d`` as an older mpitrain wrote it: no run id anywhere."""
    for path in ckpt.list_checkpoints(d):
        state = ckpt.load(path)
        for key in ("run_id", "saved_at", "step"):
            state.pop(key, None)
        state["format"] = 1
        torch.save(state, path)
        digest = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def test_format_1_checkpoints_resume_as_an_unknown_run(
    used_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _to_format_1(used_dir)
    old = _files(used_dir)
    with pytest.raises(ConfigError, match="a run without a run id"):
        _train(["--max-steps", "9", "--checkpoint-dir", str(used_dir)])  # fresh: still refused
    capsys.readouterr()
    args = ["--max-steps", "10", "--checkpoint-every", "1", "--checkpoint-dir", str(used_dir)]
    assert _train([*args, "--resume", "auto"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "resumed from" in ln)
    assert "step-000000008.pt" in line and "run unknown" in line, line
    new = {ckpt.read_info(ckpt.checkpoint_path(used_dir, s)).run_id for s in (9, 10)}
    assert len(new) == 1 and None not in new  # one new id for the continued run
    # the unknown run's files are not this run's to prune: all three are still there
    assert {n: b for n, b in _files(used_dir).items() if n in old and n != "latest"} == {
        n: b for n, b in old.items() if n != "latest"
    }
    # and resuming again continues the same (now identified) run
    assert _train([*args[:1], "12", *args[2:], "--resume", "auto"]) == 0
    assert ckpt.read_info(ckpt.checkpoint_path(used_dir, 12)).run_id in new


def test_resume_into_directory_of_another_run_is_refused(used_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    ckpt.save({"w": torch.zeros(2)}, other, 50, keep_last=3, run_id="someone-else")
    before = _files(other)
    src = used_dir / "step-000000007.pt"
    with pytest.raises(ConfigError) as info:
        _train(["--max-steps", "9", "--checkpoint-dir", str(other), "--resume", str(src)])
    msg = str(info.value)
    assert f"'{other}'" in msg and "run someone-else" in msg and "step 50" in msg, msg
    assert "HINT" in msg and "\n" not in msg
    assert _files(other) == before


@pytest.mark.parametrize("with_dir", [False, True])
def test_preemption_message_says_whether_a_checkpoint_was_saved(
    module_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    with_dir: bool,
) -> None:
    monkeypatch.setenv("TEST_STEP", "3")
    d = tmp_path / "ckpt"
    args = ["--model", f"{MODELS}:signals", "--preempt-signals", "USR1"]
    code = _train([*args, *(["--checkpoint-dir", str(d)] if with_dir else [])])
    assert code == 99
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "preempted" in ln)
    if with_dir:
        found = re.search(r"checkpoint saved to (\S+),", line)
        assert found is not None, line
        saved = Path(found.group(1))
        assert saved.parent == d and ckpt.verify(saved) is None, line
    else:
        assert "checkpoint saved" not in line, line
        assert "no checkpoint written (no --checkpoint-dir)" in line, line
        assert not d.exists()


# ---- the checkpoint module on its own ---------------------------------------------------------


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((4,), v)}


def test_pruning_deletes_only_this_runs_files(tmp_path: Path) -> None:
    for step in (50, 60):
        ckpt.save(_state(step), tmp_path, step, keep_last=3, run_id="run-x")
    theirs = _files(tmp_path)
    for step in (1, 2, 3, 4):
        path = ckpt.save(_state(step), tmp_path, step, keep_last=2, run_id="run-y")
        assert ckpt.verify(path) is None  # never pruned right after it was written
        assert (tmp_path / "latest").read_text().strip() == path.name
    now = _files(tmp_path)
    assert {n: now[n] for n in theirs if n != "latest"} == {
        n: b for n, b in theirs.items() if n != "latest"
    }
    mine = sorted(i.step for i in ckpt.checkpoint_infos(tmp_path) if i.run_id == "run-y")
    assert mine == [3, 4]


def test_never_overwrites_another_runs_file(tmp_path: Path) -> None:
    ckpt.save(_state(1.0), tmp_path, 5, keep_last=3, run_id="run-x")
    before = _files(tmp_path)
    with pytest.raises(CheckpointError, match=r"belongs to run run-x.*HINT"):
        ckpt.save(_state(2.0), tmp_path, 5, keep_last=3, run_id="run-y")
    assert _files(tmp_path) == before
    # its own file a run may rewrite (a resumed run passing a damaged newer save again)
    ckpt.save(_state(3.0), tmp_path, 6, keep_last=3, run_id="run-x")
    ckpt.save(_state(4.0), tmp_path, 6, keep_last=3, run_id="run-x")
    assert torch.equal(ckpt.load(tmp_path / "step-000000006.pt")["w"], torch.full((4,), 4.0))


def test_pruning_keeps_the_latest_saves_after_resuming_an_older_step(tmp_path: Path) -> None:
    """A run resumed from step 2 while its steps 3..5 exist: its new saves are the ones kept."""
    for step in (1, 2, 3, 4, 5):
        ckpt.save(_state(step), tmp_path, step, keep_last=5, run_id="r")
    new = ckpt.save(_state(2.5), tmp_path, 3, keep_last=1, run_id="r")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [new.name]
    assert ckpt.find_latest(tmp_path) == new


def test_sidecar_still_checks_with_sha256sum(tmp_path: Path) -> None:
    ckpt.save(_state(1.0), tmp_path, 7, keep_last=3, run_id="r1")
    text = (tmp_path / "step-000000007.pt.sha256").read_text().splitlines()
    assert re.fullmatch(r"[0-9a-f]{64}  step-000000007\.pt", text[0])
    assert text[1].startswith("# mpitrain run=r1 step=7 saved=")
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    proc = subprocess.run(
        ["sha256sum", "-c", "step-000000007.pt.sha256"], cwd=tmp_path, capture_output=True
    )
    assert proc.returncode == 0 and b"OK" in proc.stdout, proc


def test_run_ids_are_unique_and_plain() -> None:
    ids = {ckpt.new_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", i) for i in ids)


def test_decide_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    fresh = ckpt.decide_run(None, empty)
    assert fresh.resume_from is None and fresh.run_id
    one = tmp_path / "one"
    ckpt.save(_state(1.0), one, 4, keep_last=3, run_id="r1")
    ckpt.save(_state(2.0), one, 5, keep_last=3, run_id="r1")
    plan = ckpt.decide_run("auto", one)
    assert plan.run_id == "r1" and plan.resume_from is not None
    assert plan.resume_from.step == 5
    # an explicit older checkpoint of the same run, in its own directory
    assert ckpt.decide_run(str(one / "step-000000004.pt"), one).run_id == "r1"
    # resuming from elsewhere into an empty directory keeps the id
    assert ckpt.decide_run(str(one / "step-000000004.pt"), empty).run_id == "r1"
    # nothing usable left: the run starts over under the directory's id
    for p in ckpt.list_checkpoints(one):
        p.write_bytes(p.read_bytes()[:50])
    plan = ckpt.decide_run("auto", one)
    assert plan.run_id == "r1" and plan.resume_from is None
    # two runs in one directory: --resume auto cannot tell which one to continue
    two = tmp_path / "two"
    ckpt.save(_state(1.0), two, 4, keep_last=3, run_id="r1")
    ckpt.save(_state(2.0), two, 3, keep_last=3, run_id="r2")
    with pytest.raises(ConfigError, match=r"holds checkpoints of run r1 \(newest: step 4"):
        ckpt.decide_run("auto", two)
    with pytest.raises(ConfigError, match="already holds checkpoints of run r2"):
        ckpt.decide_run(None, two)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.decide_run(str(one / "step-000000004.pt"), empty)


def test_unusable_directory_or_resume_path_refused_up_front(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"--checkpoint-dir '.*file' is not a directory.*HINT"):
        ckpt.decide_run(None, a_file)
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file.*HINT"):
        ckpt.decide_run(str(tmp_path), None)
    # a fresh directory is created at the start, so an unwritable one fails before training
    fresh = tmp_path / "a" / "b"
    ckpt.decide_run(None, fresh)
    assert fresh.is_dir() and not list(fresh.iterdir())


def test_unwritable_directory_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.write_bytes

    def read_only(self: Path, data: bytes) -> int:
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(ConfigError, match=r"is not writable: .*Permission denied.*HINT"):
        ckpt.decide_run(None, tmp_path)


class _FakeComm:
    """One rank of a 2-rank job: rank 0 records what it broadcasts, rank 1 receives it."""

    def __init__(self, rank: int, received: Any = None) -> None:
        self.rank = rank
        self.received = received
        self.sent: Any = None

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.rank == root:
            self.sent = obj
            return obj
        return self.received


def test_refusal_is_decided_by_rank_0_for_every_rank(tmp_path: Path) -> None:
    used = tmp_path / "used"
    ckpt.save(_state(1.0), used, 3, keep_last=3, run_id="r1")
    rank0 = _FakeComm(0)
    with pytest.raises(ConfigError) as first:
        ckpt.plan_run(rank0, None, used)  # type: ignore[arg-type]
    # rank 1 sees an empty directory (node-local path): it still raises rank 0's error
    rank1 = _FakeComm(1, received=rank0.sent)
    with pytest.raises(ConfigError) as second:
        ckpt.plan_run(rank1, None, tmp_path / "node-local-empty")  # type: ignore[arg-type]
    assert str(first.value) == str(second.value)
    # and a plan (the run id) is the same on every rank
    rank0 = _FakeComm(0)
    plan = ckpt.plan_run(rank0, None, tmp_path / "new")  # type: ignore[arg-type]
    assert ckpt.plan_run(_FakeComm(1, rank0.sent), None, used) == plan  # type: ignore[arg-type]
