"""The built-in byte-level corpus made from the Python standard library's own sources."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpitrain.data import ShardedDataset, corpus, load_manifest
from mpitrain.errors import DataError
from mpitrain.train import builtin
from tests.unit.test_data_safety import ROOT, one_line_error, run_cli

CTX = 32
CAPS = {"max_train_bytes": 64 << 10, "max_test_bytes": 16 << 10}


@pytest.fixture(scope="module")
def small() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    return corpus.corpus_windows(CTX, **CAPS)


def split_bytes(names: list[str], cap: int) -> bytes:
    """The bytes of a split rebuilt from its file list: the files in order, cut to the cap."""
    files = dict(corpus.stdlib_files())
    return b"".join(files[n].read_bytes() for n in names)[:cap]


def test_stdlib_files_skip_installed_packages_and_caches(tmp_path: Path) -> None:
    for rel in ("b/x.py", "a.py", "site-packages/p.py", "q/dist-packages/d.py",
                "b/__pycache__/c.py", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("pass\n")
    found = corpus.stdlib_files(tmp_path)
    assert [r for r, _ in found] == ["a.py", "b/x.py"]
    assert all(p.is_absolute() and p == tmp_path / r for r, p in found)
    real = corpus.stdlib_files()
    assert len(real) > 100 and [r for r, _ in real] == sorted(r for r, _ in real)


def test_split_is_by_file_and_deterministic() -> None:
    names = [r for r, _ in corpus.stdlib_files()]
    first = [corpus.split_of(n) for n in names]
    assert first == [corpus.split_of(n) for n in names]
    share = first.count("test") / len(first)
    assert 0.05 < share < 0.15, share
    # a larger test share only moves files from train to test
    wider = {n for n in names if corpus.split_of(n, 30) == "test"}
    assert {n for n, s in zip(names, first, strict=True) if s == "test"} < wider


def test_windows_overlap_by_one_byte_and_respect_the_caps(small: Any) -> None:
    arrays, splits, params = small
    x, y = arrays["x"], arrays["y"]
    assert x.dtype == np.uint8 and x.shape[1] == CTX + 1 and y.dtype == np.int64
    assert len(x) == len(y) == len(splits["train"]) + len(splits["test"])
    assert np.array_equal(splits["test"], np.arange(len(splits["train"]), len(x)))
    for name, cap in (("train", CAPS["max_train_bytes"]), ("test", CAPS["max_test_bytes"])):
        win = x[splits[name]]
        assert len(win) == (cap - 1) // CTX  # the stdlib has more than the cap: it is reached
        assert np.array_equal(win[:-1, -1], win[1:, 0])  # stride = context
        data = split_bytes(params["file_lists"][name], cap)
        assert len(data) == cap and hashlib.sha256(data).hexdigest() == params["sha256"][name]
        stream = np.concatenate([win[0], win[1:, 1:].ravel()])
        assert stream.tobytes() == data[: len(stream)]  # every byte after the first once
        assert len(data) - len(stream) < CTX  # only an incomplete tail is dropped
    assert params["context"] == CTX and params["python"] == sys.version.split()[0]
    assert params["source"] == "python-stdlib" and params["test_percent"] == 10


def test_labels_name_the_file_each_window_starts_in(small: Any) -> None:
    arrays, splits, params = small
    lists = params["file_lists"]
    assert not set(lists["train"]) & set(lists["test"])
    for name, files in lists.items():
        assert params["num_files"][name] == len(files) > 1
        assert all(corpus.split_of(f) == name for f in files)
        sizes = [len(p.read_bytes()) for p in map(dict(corpus.stdlib_files()).get, files) if p]
        starts = np.cumsum([0, *sizes[:-1]])
        y = arrays["y"][splits[name]]
        expect = np.searchsorted(starts, np.arange(len(y)) * CTX, side="right") - 1
        assert np.array_equal(y, expect) and y[0] == 0 and y.max() < len(files)
    assert corpus.num_classes(params) == max(len(v) for v in lists.values())


def test_the_same_python_gives_the_same_corpus(small: Any) -> None:
    arrays, _, params = corpus.corpus_windows(CTX, **CAPS)
    assert params == small[2]
    assert all(np.array_equal(arrays[k], small[0][k]) for k in arrays)


def test_bad_options_and_empty_stdlib_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"out of range.*HINT"):
        corpus.corpus_windows(0)
    with pytest.raises(DataError, match=r"test split .* 0 windows.*HINT: raise its byte cap"):
        corpus.corpus_windows(CTX, max_train_bytes=1 << 10, max_test_bytes=CTX)
    monkeypatch.setattr(corpus, "stdlib_files", lambda root=None: [])
    with pytest.raises(DataError, match=r"has no \.py files.*HINT"):
        corpus.corpus_windows(CTX)


def test_ensure_corpus_writes_once_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpi4py import MPI

    monkeypatch.setenv("MPITRAIN_CACHE", str(tmp_path))
    out = builtin.ensure_corpus(MPI.COMM_SELF, 256)
    assert out == tmp_path / "pystdlib-ctx256-v1"
    ds = ShardedDataset(out, split="train")
    assert ds.feature_shape == (257,) and len(ds) == ((2 << 20) - 1) // 256
    assert len(ShardedDataset(out, split="test")) == ((256 << 10) - 1) // 256
    x, y = ds.read_arrays(np.arange(3))
    assert np.array_equal(x[:-1, -1], x[1:, 0]) and x.max() <= 255 and y[0] == 0
    m = load_manifest(out)
    assert m.name == "pystdlib" and m.params["sha256"]["train"]
    assert m.shards[0].num_samples == 4096
    assert m.classes == corpus.num_classes(m.params)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached corpus was written again")

    monkeypatch.setattr(corpus, "write_corpus", fail)
    assert builtin.ensure_corpus(MPI.COMM_SELF, 256) == out


def test_data_tools_corpus_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "data_tools", "corpus", "--out", str(out), "--context",
           str(CTX), "--max-train-mb", "0.0625", "--max-test-mb", "0.015625",
           "--samples-per-shard", "1000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "dataset 'pystdlib'" in done.stdout and "split test" in done.stdout
    want, _, params = corpus.corpus_windows(CTX, **CAPS)
    assert load_manifest(out).params == {**params, "converted": "x: uint8 -> float32"}
    ds = ShardedDataset(out)
    x, y = ds.read_arrays(np.arange(len(ds)))
    assert np.array_equal(x, want["x"]) and np.array_equal(y, want["y"])
    assert len(load_manifest(out).shards) == -(-len(ds) // 1000)

    # an existing --out is refused as convert refuses it, and left as it was
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli("corpus", "--out", str(out), "--context", str(CTX))
    assert code == 1
    one_line_error(err, "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code, _, err = run_cli("corpus", "--out", str(tmp_path / "mine"), "--context", "8",
                           "--overwrite")
    assert code == 1 and (tmp_path / "mine" / "keep.txt").exists()
    one_line_error(err, "keep.txt")
    code, _, err = run_cli("corpus", "--out", str(out), "--context", str(CTX), "--overwrite",
                           "--max-train-mb", "0.0625", "--max-test-mb", "0.015625")
    assert code == 0, err
    assert load_manifest(out).params["max_train_bytes"] == 64 << 10
