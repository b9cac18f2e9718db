"""A table of bad manifests, shards and split files: each is a one-line DataError that names the
file and key and carries a HINT (never a traceback, never silent acceptance)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from data_tools import report
from mpitrain.data import ShardedDataset, load_manifest
from mpitrain.data.writer import write_dataset
from mpitrain.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
N = 100  # samples: shards of 32, 32, 32, 4 named toy-0000{0..3}.h5; 5 classes

Mutation = Callable[[Path], None]


@pytest.fixture()
def ds(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.random((N, 3, 4), dtype=np.float32),
        "y": np.arange(N) % 5,
        "t": np.arange(N),
    }
    return write_dataset(
        tmp_path / "ds", arrays, name="toy", samples_per_shard=32,
        splits={"test": np.arange(0, N, 10)},
    )


# -- manifest edits --


def edit(fn: Callable[[dict[str, Any]], Any]) -> Mutation:
    def mutate(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        fn(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return mutate


def raw(text: bytes | Callable[[str], str]) -> Mutation:
    def mutate(d: Path) -> None:
        path = d / "manifest.json"
        if callable(text):
            path.write_text(text(path.read_text()))
        else:
            path.write_bytes(text)

    return mutate


def setitem(*keys: Any, value: Any) -> Mutation:
    def fn(m: dict[str, Any]) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return edit(fn)


def delitem(*keys: Any) -> Mutation:
    def fn(m: dict[str, Any]) -> None:
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]

    return edit(fn)


def replace_number(key: str, literal: str) -> Mutation:
    import re

    return raw(lambda t: re.sub(rf'"{key}": -?\d+', f'"{key}": {literal}', t, count=1))


def inflate_shard(m: dict[str, Any]) -> None:
    m["shards"][1]["num_samples"] += 10**9
    m["num_samples"] += 10**9
    m["class_counts"]["0"] += 10**9  # consistent totals: only the file size can tell


def duplicate_shard(m: dict[str, Any]) -> None:
    m["shards"][1] = dict(m["shards"][0])


def dup_key(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text.replace('"name":', '"chunk_samples": 5, "name":', 1))


def manifest_dir(d: Path) -> None:
    (d / "manifest.json").unlink()
    (d / "manifest.json").mkdir()


MANIFEST_CASES: dict[str, tuple[Mutation, list[str]]] = {
    "top-level-list": (raw(b"[]"), ["object"]),
    "empty-file": (raw(b""), ["not valid JSON"]),
    "a-directory": (manifest_dir, ["cannot be read"]),
    "non-utf8": (raw(b'{"name": "\xff\xfe"}'), ["UTF-8"]),
    "deep-nesting": (raw(b"[" * 200_000 + b"]" * 200_000), ["nest"]),
    "duplicate-json-key": (dup_key, ["duplicate key", "chunk_samples"]),
    "arrays-is-list": (edit(lambda m: m.update(arrays=[m["arrays"]])), ["'arrays'"]),
    "array-spec-is-list": (setitem("arrays", "x", value=[[3, 4], "float32"]), ["'arrays.x'"]),
    "shards-is-object": (setitem("shards", value={"a": 1}), ["'shards'"]),
    "shard-entry-is-list": (setitem("shards", 0, value=["toy-00000.h5", 32, "0" * 64]),
                            ["'shards[0]'"]),
    "num-samples-nan": (replace_number("num_samples", "NaN"), ["NaN"]),
    "chunk-infinity": (replace_number("chunk_samples", "Infinity"), ["Infinity"]),
    "chunk-minus-infinity": (replace_number("chunk_samples", "-Infinity"), ["-Infinity"]),
    "chunk-zero": (setitem("chunk_samples", value=0), ["'chunk_samples'", "0"]),
    "chunk-negative": (setitem("chunk_samples", value=-5), ["'chunk_samples'", "-5"]),
    "chunk-float": (setitem("chunk_samples", value=2.5), ["'chunk_samples'", "2.5"]),
    "chunk-bool": (setitem("chunk_samples", value=True), ["'chunk_samples'", "True"]),
    "chunk-string": (setitem("chunk_samples", value="64"), ["'chunk_samples'", "'64'"]),
    "num-samples-bool": (setitem("num_samples", value=True), ["'num_samples'"]),
    "shard-count-negative": (setitem("shards", 3, "num_samples", value=-4), ["'shards[3]"]),
    "shape-negative": (setitem("arrays", "x", "shape", value=[-3, 4]), ["'arrays.x.shape'"]),
    "shape-zero": (setitem("arrays", "x", "shape", value=[0, 4]), ["'arrays.x.shape'"]),
    "shape-float": (setitem("arrays", "x", "shape", value=[1.5, 4]), ["'arrays.x.shape'"]),
    "shape-string": (setitem("arrays", "x", "shape", value="3x4"), ["'arrays.x.shape'"]),
    "shape-bool": (setitem("arrays", "x", "shape", value=[True, 4]), ["'arrays.x.shape'"]),
    "shape-null": (setitem("arrays", "x", "shape", value=None), ["'arrays.x.shape'"]),
    "shape-nested": (setitem("arrays", "x", "shape", value=[[3], 4]), ["'arrays.x.shape'"]),
    "shape-overflow": (setitem("arrays", "x", "shape", value=[2**62, 2**62]), ["'arrays.x"]),
    "dtype-object": (setitem("arrays", "x", "dtype", value="object"), ["'arrays.x.dtype'"]),
    "dtype-number": (setitem("arrays", "x", "dtype", value=5), ["'arrays.x.dtype'"]),
    "dtype-nonsense": (setitem("arrays", "x", "dtype", value="float33"), ["'arrays.x.dtype'"]),
    "dtype-not-canonical": (setitem("arrays", "x", "dtype", value="<f4"), ["'arrays.x.dtype'"]),
    "labels-float": (setitem("arrays", "y", "dtype", value="float32"), ["'arrays.y", "integer"]),
    "labels-not-scalar": (setitem("arrays", "y", "shape", value=[2]), ["'arrays.y"]),
    "array-name-path": (edit(lambda m: m["arrays"].update({"a/b": m["arrays"]["t"]})),
                        ["'a/b'"]),
    "no-x": (delitem("arrays", "x"), ["'x'"]),
    "schema-newer": (setitem("schema_version", value=2), ["schema_version", "2"]),
    "schema-zero": (setitem("schema_version", value=0), ["schema_version", "0"]),
    "schema-string": (setitem("schema_version", value="1"), ["schema_version"]),
    "schema-missing": (delitem("schema_version"), ["schema_version"]),
    "unknown-field": (setitem("extra", value=1), ["'extra'"]),
    "name-not-string": (setitem("name", value=5), ["'name'"]),
    "sha-not-hex": (setitem("shards", 0, "sha256", value="zz"), ["'shards[0].sha256'"]),
    "shard-file-not-string": (setitem("shards", 0, "file", value=7), ["'shards[0].file'"]),
    "shard-file-outside": (setitem("shards", 0, "file", value="../toy-00000.h5"), ["outside"]),
    "shard-file-control": (setitem("shards", 0, "file", value="toy\n.h5"), ["shards[0].file"]),
    "compression-unknown": (setitem("compression", value="zstd"), ["'compression'", "zstd"]),
    "num-classes-zero": (setitem("num_classes", value=0), ["'num_classes'"]),
    "num-classes-float": (setitem("num_classes", value=2.5), ["'num_classes'"]),
    "num-classes-bool": (setitem("num_classes", value=True), ["'num_classes'"]),
    "class-key-not-int": (setitem("class_counts", "a", value=3), ["'class_counts'", "'a'"]),
    "class-count-negative": (setitem("class_counts", "0", value=-1), ["'class_counts.0'"]),
    "class-beyond-num-classes": (setitem("class_counts", "9", value=0),
                                 ["'class_counts'", "9"]),
    "class-counts-sum": (setitem("class_counts", "0", value=1), ["class_counts", "100"]),
    "splits-is-list": (setitem("splits", value=[]), ["'splits'"]),
    "split-name-path": (edit(lambda m: m["splits"].update({"../a": m["splits"]["test"]})),
                        ["'../a'"]),
    "split-file-outside": (setitem("splits", "test", "file", value="../s.npy"), ["outside"]),
    "split-count-negative": (setitem("splits", "test", "num_samples", value=-1),
                             ["'splits.test.num_samples'"]),
    "params-is-list": (setitem("params", value=[1]), ["'params'"]),
    "totals-disagree": (setitem("num_samples", value=N + 1), ["do not add up"]),
    "duplicate-shard": (edit(duplicate_shard), ["duplicate", "toy-00000.h5"]),
    "huge-declared-shard": (edit(inflate_shard), ["toy-00001.h5", "bytes"]),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest(ds: Path, case: str) -> None:
    mutate, needles = MANIFEST_CASES[case]
    mutate(ds)
    expect_error(lambda: ShardedDataset(ds), "manifest.json", *needles)


# -- shard (HDF5) edits --


def rewrite(shard: int, key: str, make: Callable[[h5py.File, Any, Path], None]) -> Mutation:
    def mutate(d: Path) -> None:
        with h5py.File(d / f"toy-{shard:05d}.h5", "r+") as f:
            data = f[key][()]
            del f[key]
            make(f, data, d)

    return mutate


def outside_file(d: Path, data: Any) -> Path:
    other = d.parent / "outside.h5"
    with h5py.File(other, "w") as f:
        f["x"] = data
    return other


def external_link(f: h5py.File, data: Any, d: Path) -> None:
    f["x"] = h5py.ExternalLink(str(outside_file(d, data)), "/x")


def soft_link(f: h5py.File, data: Any, d: Path) -> None:
    f["x_real"] = data
    f["x"] = h5py.SoftLink("/x_real")


def external_storage(f: h5py.File, data: Any, d: Path) -> None:
    raw_file = d.parent / "outside.bin"
    raw_file.write_bytes(np.ascontiguousarray(data).tobytes())
    f.create_dataset("x", shape=data.shape, dtype=data.dtype, external=[(str(raw_file), 0,
                                                                         data.nbytes)])


def virtual(f: h5py.File, data: Any, d: Path) -> None:
    outside_file(d, data)
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[:] = h5py.VirtualSource(str(d.parent / "outside.h5"), "x", shape=data.shape)
    f.create_virtual_dataset("x", layout)


def group(f: h5py.File, data: Any, d: Path) -> None:
    f.create_group("x")["inner"] = data


def sparse(f: h5py.File, data: Any, d: Path) -> None:
    f.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=(4, *data.shape[1:]))


def labels(value: int) -> Callable[[h5py.File, Any, Path], None]:
    def make(f: h5py.File, data: Any, d: Path) -> None:
        data = data.copy()
        data[5] = value
        f["y"] = data

    return make


def garbage(d: Path) -> None:
    (d / "toy-00001.h5").write_bytes(os.urandom(4096))


def extra_external_link(d: Path) -> None:
    with h5py.File(d / "toy-00001.h5", "r+") as f:
        f["z"] = h5py.ExternalLink(str(outside_file(d, np.zeros(3))), "/x")


def shard_is_symlink_outside(d: Path) -> None:
    target = d.parent / "elsewhere.h5"
    (d / "toy-00001.h5").rename(target)
    (d / "toy-00001.h5").symlink_to(target)


def truncated(d: Path) -> None:
    p = d / "toy-00001.h5"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


SHARD_CASES: dict[str, tuple[Mutation, list[str]]] = {
    "garbage-bytes": (garbage, ["cannot be read"]),
    "truncated": (truncated, []),
    "external-link": (rewrite(1, "x", external_link), ["external link", "'x'"]),
    "soft-link": (rewrite(1, "x", soft_link), ["link", "'x'"]),
    "external-raw-storage": (rewrite(1, "x", external_storage), ["external", "'x'"]),
    "virtual-dataset": (rewrite(1, "x", virtual), ["virtual", "'x'"]),
    "group-not-dataset": (rewrite(1, "x", group), ["'x'", "group"]),
    "unallocated-chunks": (rewrite(1, "x", sparse), ["'x'", "allocated"]),
    "stray-external-link": (extra_external_link, ["external link", "'z'"]),
    "symlink-outside": (shard_is_symlink_outside, ["outside"]),
    "label-too-large": (rewrite(1, "y", labels(7)), ["'y'", "7", "[0, 5)"]),
    "label-negative": (rewrite(1, "y", labels(-1)), ["'y'", "-1", "[0, 5)"]),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_bad_shard(ds: Path, case: str) -> None:
    mutate, needles = SHARD_CASES[case]
    mutate(ds)
    expect_error(lambda: ShardedDataset(ds), "toy-00001.h5", *needles)
    if case == "symlink-outside":  # refused with the manifest, before any shard is opened
        expect_error(lambda: report.verify(ds), "toy-00001.h5", *needles)
        return
    problems = report.verify(ds)  # verify reports it (one line) instead of following it
    assert len(problems) == 1 and "toy-00001.h5" in problems[0] and "\n" not in problems[0]


def test_labels_checked_batch_by_batch_when_too_many_to_check_at_open(
    ds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpitrain.data import dataset

    rewrite(2, "y", labels(9))(ds)
    monkeypatch.setattr(dataset, "LABEL_CHECK_BYTES", 0)
    d = ShardedDataset(ds, in_memory=False)
    d.read_batch(np.arange(10))  # shard 0 is fine
    expect_error(lambda: d.read_batch(np.arange(60, 80)), "toy-00002.h5", "9", "[0, 5)")


# -- token data (--model gpt): x holds ids in [0, vocab), like labels in [0, classes) --

VOCAB = 256


@pytest.fixture()
def tokens(tmp_path: Path) -> Path:
    """Windows of 9 byte ids (as data_tools stores them: float32), vocab recorded."""
    rng = np.random.default_rng(1)
    split = {"train": np.arange(0, N - 20), "test": np.arange(N - 20, N)}
    return write_dataset(
        tmp_path / "tok", {"x": rng.integers(0, VOCAB, (N, 9)), "y": np.zeros(N, np.int64)},
        name="toy", samples_per_shard=32, splits=split, params={"vocab": VOCAB},
    )


def token(value: float) -> Callable[[h5py.File, Any, Path], None]:
    def make(f: h5py.File, data: Any, d: Path) -> None:
        data = data.copy()
        data[5, 3] = value
        f["x"] = data

    return make


TOKEN_CASES: dict[str, tuple[float, str]] = {
    "fractional": (2.5, "is not an integer"),
    "negative": (-1.0, "is negative"),
    "too-large": (256.0, "is not below the vocabulary size 256"),
    "nan": (float("nan"), "is not a finite number"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_bad_token_ids(tokens: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpitrain.data import dataset

    value, why = TOKEN_CASES[case]
    rewrite(1, "x", token(value))(tokens)  # shard 1 = samples 32..63: sample 37
    m = json.loads((tokens / "manifest.json").read_text())  # as if written with that value
    m["shards"][1]["sha256"] = hashlib.sha256((tokens / "toy-00001.h5").read_bytes()).hexdigest()
    (tokens / "manifest.json").write_text(json.dumps(m))
    needles = ["toy-00001.h5", "'x'", repr(value), "sample 5", "position 3", why,
               "[0, 256)", "data_tools"]
    expect_error(lambda: ShardedDataset(tokens, "train", tokens=VOCAB), *needles)
    assert len(ShardedDataset(tokens, "train")) == N - 20  # as features the values are fine
    problems = report.verify(tokens)  # the manifest records the vocabulary: verify checks ids
    assert len(problems) == 1 and all(n in problems[0] for n in needles), problems
    monkeypatch.setattr(dataset, "TOKEN_CHECK_BYTES", 0)  # too large to check at open
    d = ShardedDataset(tokens, "train", tokens=VOCAB, in_memory=False)
    d.read_batch(np.arange(30))  # samples 0..29 are fine
    expect_error(lambda: d.read_batch(np.arange(60, 20, -1)), *needles)


def test_declared_vocabulary_larger_than_the_models_is_refused(tokens: Path) -> None:
    edit(lambda m: m["params"].update(vocab=50257))(tokens)
    expect_error(lambda: ShardedDataset(tokens, tokens=VOCAB), "50257", "256", "params.vocab")


def test_gpt_trainer_refuses_bad_token_ids_before_any_step(
    tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--model gpt --data D: one DataError naming shard, sample and value (it was an
    IndexError in the embedding: a device-side assert on a GPU), at open or in the batch."""
    from mpi4py import MPI

    from mpitrain.data import dataset
    from mpitrain.train.run import main

    rewrite(1, "x", token(300.0))(tokens)
    argv = ["--model", "gpt", "--data", str(tokens), "--context", "8", "--hidden", "8",
            "--heads", "2", "--layers", "1", "--batch-size", "8", "--shuffle", "none",
            "--no-progress", "--log-level", "warning", "--summary-json",
            str(tmp_path / "s.json")]
    needles = ["toy-00001.h5", "300.0", "sample 5", "position 3", "[0, 256)"]
    expect_error(lambda: main(argv, MPI.COMM_SELF), *needles)
    monkeypatch.setattr(dataset, "TOKEN_CHECK_BYTES", 0)  # checked in the batch that reads it
    expect_error(lambda: main(argv, MPI.COMM_SELF), *needles)  # at step 4 (samples 32..39)
    assert not (tmp_path / "s.json").exists()


# -- split index files --


def split_file(arr: Any, *, pickle: bool = False, count: int | None = None) -> Mutation:
    def mutate(d: Path) -> None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=pickle)
        data = buf.getvalue()
        m = json.loads((d / "manifest.json").read_text())
        sp = m["splits"]["test"]
        (d / sp["file"]).write_bytes(data)
        sp["sha256"] = hashlib.sha256(data).hexdigest()
        sp["num_samples"] = len(arr) if count is None else count
        (d / "manifest.json").write_text(json.dumps(m))

    return mutate


def split_garbage(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    (d / m["splits"]["test"]["file"]).write_bytes(b"\x93NUMPY garbage")


def split_missing(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    (d / m["splits"]["test"]["file"]).unlink()


SPLIT_CASES: dict[str, tuple[Mutation, list[str]]] = {
    "negative-index": (split_file(np.array([-1, 3, 5])), ["-1", "position 0"]),
    "index-too-large": (split_file(np.array([0, 7, N])), [str(N), "position 2"]),
    "float-indices": (split_file(np.array([0.0, 1.0])), ["float64"]),
    "bool-indices": (split_file(np.array([True, False])), ["bool"]),
    "two-dimensional": (split_file(np.zeros((2, 2), dtype=np.int64)), ["2-D"]),
    "duplicates": (split_file(np.array([1, 1, 2])), ["position 1", "sorted"]),
    "unsorted": (split_file(np.array([3, 1, 2])), ["position 1", "sorted"]),
    "pickled-objects": (split_file(np.array([1, "a"], dtype=object), pickle=True), []),
    "garbage": (split_garbage, []),
    "missing": (split_missing, ["missing"]),
    "count-disagrees": (split_file(np.array([1, 2, 3]), count=10), ["3", "10"]),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_bad_split_file(ds: Path, case: str) -> None:
    mutate, needles = SPLIT_CASES[case]
    mutate(ds)
    ShardedDataset(ds)  # the whole dataset still opens
    expect_error(lambda: ShardedDataset(ds, split="test"), "split-test", *needles)
    problems = report.verify(ds)
    assert len(problems) == 1 and "split-test" in problems[0]


def expect_error(fn: Callable[[], Any], *needles: str) -> None:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "HINT" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_a_good_dataset_passes_every_check(ds: Path) -> None:
    assert report.verify(ds) == []
    assert len(ShardedDataset(ds, split="test", verify=True)) == 10
    assert load_manifest(ds).num_classes == 5


# -- through the CLI: one line on stderr, exit 1 (2 for a bad flag), never a traceback --


def data_tools(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_tools", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, check=False)


def test_cli_prints_one_line_not_a_traceback(ds: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 2)), y=np.array([0.0, 0.5, 1.0]))
    raw(lambda t: t.replace('"chunk_samples": ', '"chunk_samples": NaN, "x": ', 1))(ds)
    runs = [
        (data_tools("inspect", str(ds)), 1, "manifest.json"),
        (data_tools("convert", "--npz", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")),
         1, "bad.npz"),
        (data_tools("convert", "--synthetic", "5", "--features", "28xfoo", "--out",
                    str(tmp_path / "o")), 2, "--features"),
        (data_tools("split", str(ds), "--fractions", "0.8,nan"), 2, "--fractions"),
    ]
    for proc, code, needle in runs:
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
        if code == 1:
            assert len(proc.stderr.strip().splitlines()) == 1 and "HINT" in proc.stderr
    assert not (tmp_path / "o").exists()
