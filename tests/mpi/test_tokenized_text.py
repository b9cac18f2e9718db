"""Text data end to end on 2 ranks: ``data_tools tokenize`` (a BPE learnt here) -> ``--model
gpt --data`` with the vocabulary split over 2 tensor ranks -> a run resumed mid-epoch equal,
bitwise, to the uninterrupted one; the sample log covers the windows once per epoch; a resume
on other token data is refused."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from mpitrain.checkpoint import files as ckpt
from mpitrain.checkpoint.shards import read_shards
from mpitrain.train.sample_log import read_sample_log
from tests.conftest import MpiRun

JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"  # text with no download
# a tiny GPT: 1 layer x 16 wide, plain SGD, tensor 2 (each rank embeds half the vocabulary)
COMMON = ["-m", "mpitrain", "--model", "gpt", "--context", "16", "--hidden", "16", "--heads",
          "2", "--layers", "1", "--optimizer", "sgd", "--lr", "0.1", "--no-scale-lr",
          "--warmup-epochs", "0", "--prefetch", "1", "--no-progress", "--tensor-parallel", "2",
          "--batch-size", "16", "--epochs", "2", "--checkpoint-every", "15", "--keep-last", "5"]


def _grid_dir(ckpt_dir: Path, step: int) -> Path:
    return next(ckpt_dir.glob(f"ckpt-step-{step:08d}-*.grid"))


def _tokenize(text: str, out: Path) -> list[str]:
    return ["-m", "data_tools", "tokenize", text, "--out", str(out), "--context", "16",
            "--tokenizer", "bpe", "--vocab-size", "384", "--samples-per-shard", "256"]


@pytest.mark.mpi
def test_tokenize_train_resume_bitwise(mpirun: MpiRun, tmp_path: Path) -> None:
    data = tmp_path / "tok"
    mpirun(2, _tokenize(str(JSON / "decoder.py"), data))  # 12 KB of text
    m = json.loads((data / "manifest.json").read_text())
    ntrain = m["splits"]["train"]["num_samples"]
    assert m["params"]["vocab"] == 384 and (data / "tokenizer.json").is_file()
    a, b = tmp_path / "a", tmp_path / "b"
    run = [*COMMON, "--data", str(data)]
    mpirun(2, [*run, "--checkpoint-dir", str(a / "ckpt"), "--sample-log", str(a / "log"),
               "--summary-json", str(a / "summary.json")], timeout=240)
    steps = ntrain // 16
    assert steps > 15  # the checkpoint of step 15 falls inside the first epoch
    assert json.loads((a / "summary.json").read_text())["steps"] == 2 * steps
    # --sample-log: each epoch trains on every window once, but the tail that does not fill
    # a global batch of 16 (left out, as drop_last does)
    per_epoch: dict[int, list[int]] = {}
    for epoch, _step, _world, idx in read_sample_log(a / "log"):
        per_epoch.setdefault(epoch, []).extend(idx)
    assert sorted(per_epoch) == [0, 1]
    for got in per_epoch.values():
        assert len(got) == len(set(got)) == steps * 16 and 0 <= min(got) <= max(got) < ntrain
    # interrupted at step 15 (mid-epoch), resumed: the same final state, bit for bit
    (b / "ckpt").mkdir(parents=True)
    for name in ("step-000000015.pt", "step-000000015.pt.sha256"):
        shutil.copy(a / "ckpt" / name, b / "ckpt" / name)
    shutil.copytree(_grid_dir(a / "ckpt", 15), b / "ckpt" / _grid_dir(a / "ckpt", 15).name)
    proc = mpirun(2, [*run, "--checkpoint-dir", str(b / "ckpt"), "--resume", "auto"],
                  timeout=240)
    assert "resumed from" in proc.stdout and "step 15" in proc.stdout, proc.stdout
    last = 2 * steps
    _, want = read_shards(_grid_dir(a / "ckpt", last))
    _, got = read_shards(_grid_dir(b / "ckpt", last))
    for fa, fb in zip(want, got, strict=True):
        assert fa["model"]["tok.weight"].shape[0] == 384 // 2  # this tensor rank's half
        for k, v in fa["model"].items():
            assert torch.equal(v, fb["model"][k]), k
    sampler = ckpt.load(a / "ckpt" / f"step-{last:09d}.pt")["sampler"]
    assert sampler == ckpt.load(b / "ckpt" / f"step-{last:09d}.pt")["sampler"]
    assert sampler["tokens"]["vocab"] == 384
    # a resume on other token data (the same vocabulary size, another tokenizer) is refused
    from mpi4py import MPI

    from data_tools.cli import main as data_tools_main

    other = tmp_path / "other"  # one rank, in this process (the 2-rank path ran above)
    assert data_tools_main(_tokenize(str(JSON / "*.py"), other)[2:], MPI.COMM_SELF) == 0
    bad = mpirun(2, [*COMMON, "--data", str(other), "--checkpoint-dir", str(b / "ckpt"),
                     "--resume", "auto"], timeout=240, check=False)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, out
    assert "the checkpoint was trained on token data of a vocabulary of 384 tokens" in out, out
