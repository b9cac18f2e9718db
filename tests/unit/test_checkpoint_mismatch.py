"""A checkpoint resumed with settings that do not fit it is refused before anything is loaded.

Every kind — plain trainer files, ZeRO shards, model-parallel grids and the Python API's
``load_sharded`` — compares what it holds (parameter names and shapes, optimizer type and
hyperparameters) with what the run builds, and refuses with one line naming the difference and
the options it was saved with. Nothing on disk changes. The train command runs in this process
on ``MPI.COMM_SELF`` (one rank, a few steps).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpitrain.checkpoint import compat
from mpitrain.errors import CheckpointError

COMMON = ["--epochs", "1", "--no-progress", "--batch-size", "16"]
GPT = ["--model", "gpt", "--layers", "1", "--hidden", "32", "--heads", "2", "--context", "16",
       "--batch-size", "4"]


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("MPITRAIN_")]:
            mp.delenv(name)
        mp.setenv("MPITRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _train(argv: list[str]) -> int:
    from mpitrain.train.run import main

    return int(main([*COMMON, *argv], MPI.COMM_SELF))


#: saved run -> the options it was saved with
SAVED = {
    "plain": ["--hidden", "32", "--optimizer", "sgd"],
    "zero": ["--hidden", "32", "--optimizer", "adam", "--shard", "parameters"],
    "gpt": [*GPT, "--optimizer", "adamw"],
}


@pytest.fixture(scope="module")
def saved(module_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, args in SAVED.items():
        d = tmp_path_factory.mktemp(name) / "ckpt"
        assert _train([*args, "--max-steps", "2", "--checkpoint-every", "1",
                       "--checkpoint-dir", str(d)]) == 0
        out[name] = d
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


CASES = {
    "plain-hidden": ("plain", ["--hidden", "16", "--optimizer", "sgd"],
                     ["'net.1.weight' is [32, 64] there, [16, 64] now",
                      "saved with --hidden 32, this run has --hidden 16"]),
    "plain-optimizer": ("plain", ["--hidden", "32", "--optimizer", "adam"],
                        ["optimizer SGD there, Adam now", "saved with --optimizer sgd"]),
    "zero-hidden": ("zero", ["--hidden", "16", "--optimizer", "adam", "--shard", "parameters"],
                    ["'net.1.weight' is [32, 64] there, [16, 64] now", "--hidden 32"]),
    "zero-optimizer": ("zero", ["--hidden", "32", "--optimizer", "sgd", "--shard", "parameters"],
                       ["optimizer Adam there, SGD now", "saved with --optimizer adam"]),
    "zero-unsharded": ("zero", ["--hidden", "32", "--optimizer", "adam"],
                       ["saved with --shard parameters and this run is not sharded",
                        "consolidate"]),
    "plain-sharded": ("plain", ["--hidden", "32", "--optimizer", "sgd", "--shard", "optimizer"],
                      ["saved without --shard and this run is sharded"]),
    "gpt-optimizer": ("gpt", [*GPT, "--optimizer", "sgd"],
                      ["optimizer AdamW there, SGD now", "saved with --optimizer adamw"]),
    "gpt-on-plain": ("plain", [*GPT, "--optimizer", "sgd"],
                     ["saved without --shard and this run runs a tensor/pipeline grid"]),
    "gpt-hidden": ("gpt", [*GPT, "--hidden", "64", "--optimizer", "adamw"],
                   ["hidden 32 (now 64)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_other_settings_is_refused(saved: dict[str, Path], case: str) -> None:
    run, args, needles = CASES[case]
    d = saved[run]
    before = _files(d)
    with pytest.raises(CheckpointError) as info:
        _train([*args, "--max-steps", "3", "--checkpoint-dir", str(d), "--resume", "auto"])
    msg = str(info.value)
    assert "\n" not in msg and "HINT" in msg and str(d) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert _files(d) == before  # nothing loaded, written or pruned


def test_zero_stage_may_change_on_resume(saved: dict[str, Path], tmp_path: Path) -> None:
    """The stage is not a difference: the shards are re-cut for any stage and rank count."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(saved["zero"], d)
    assert _train(["--hidden", "32", "--optimizer", "adam", "--shard", "optimizer",
                   "--max-steps", "3", "--checkpoint-dir", str(d), "--resume", "auto"]) == 0


def test_load_sharded_api_refuses_another_model(tmp_path: Path) -> None:
    from mpitrain.grad.zero import ShardedDataParallel
    from mpitrain.grad.zero.state import load_sharded, save_sharded

    comm = MPI.COMM_SELF.Dup()
    try:
        a = ShardedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), comm=comm,
                                stage=2)
        opt_a = torch.optim.Adam(list(a.parameters()), lr=0.1)
        save_sharded(a, opt_a, tmp_path / "s")
        before = _files(tmp_path / "s")
        b = ShardedDataParallel(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), comm=comm,
                                stage=2)
        with pytest.raises(CheckpointError, match=r"'0.weight' is \[8, 4\] there, \[6, 4\] now"):
            load_sharded(b, torch.optim.Adam(list(b.parameters()), lr=0.1), tmp_path / "s")
        c = ShardedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), comm=comm,
                                stage=2)
        with pytest.raises(CheckpointError, match="another optimizer type"):
            load_sharded(c, torch.optim.SGD(list(c.parameters()), lr=0.1, momentum=0.9),
                         tmp_path / "s")
        load_sharded(c, torch.optim.Adam(list(c.parameters()), lr=0.1), tmp_path / "s")
        assert _files(tmp_path / "s") == before
        for x, y in zip(a.shards, c.shards, strict=True):
            assert torch.equal(x, y)
    finally:
        comm.Free()


def test_old_checkpoints_are_described_from_their_state_dicts() -> None:
    """A checkpoint without a recorded optimizer type: its hyperparameter keys tell."""
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    saved_groups, _ = compat.optimizer_holds(sgd.state_dict())
    _kind, now_groups, _ = compat.of_optimizer(adam)
    shapes = compat.tensor_shapes(model.state_dict().items())
    diffs = compat.differences(compat.Holds(shapes, groups=saved_groups),
                               compat.Holds(shapes, optimizer="Adam", groups=now_groups))
    assert len(diffs) == 1 and "another optimizer type" in diffs[0], diffs
    assert compat.differences(compat.Holds(shapes, groups=saved_groups),
                              compat.Holds(shapes, groups=saved_groups)) == []
