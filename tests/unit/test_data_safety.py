"""Data safety: --overwrite, names that become paths, concurrent writers, full disks, labels and
dtypes at convert time, and the console scripts (issue 11, data side)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_tools import cli, report, split
from data_tools.convert import convert
from mpitrain.data import ShardedDataset, load_manifest
from mpitrain.data.manifest import ArraySpec
from mpitrain.data.writer import ArraySource, write_dataset
from mpitrain.errors import DataError
from mpitrain.runtime import files

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``data_tools`` in this process on COMM_SELF; return (code, stdout, stderr)."""
    from mpi4py import MPI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv), MPI.COMM_SELF)
    return code, out.getvalue(), err.getvalue()


def one_line_error(err: str, *needles: str) -> None:
    """The CLI printed exactly one error line naming every needle, with a HINT."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "HINT" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), hidden ones included."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def small_arrays(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 3), dtype=np.float32), "y": rng.integers(0, 4, n)}


def synth(out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        "convert", "--synthetic", "30", "--features", "3", "--classes", "3",
        "--samples-per-shard", "10", "--out", str(out), *extra,
    )


# -- 1. --overwrite replaces only a dataset data_tools made, never one holding an input --


def _plain_dir(tmp: Path) -> tuple[Path, list[str]]:
    d = tmp / "victim"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return d, []


def _file_target(tmp: Path) -> tuple[Path, list[str]]:
    f = tmp / "victim"
    f.write_text("not a directory")
    return f, []


def _dataset_with_foreign_file(tmp: Path) -> tuple[Path, list[str]]:
    d = write_dataset(tmp / "victim", small_arrays(), name="v", samples_per_shard=16)
    (d / "notes.txt").write_text("mine")
    return d, []


def _dataset_with_subdir(tmp: Path) -> tuple[Path, list[str]]:
    d = write_dataset(tmp / "victim", small_arrays(), name="v", samples_per_shard=16)
    (d / "raw").mkdir()
    (d / "raw" / "data.bin").write_bytes(b"\x00\x01")
    return d, []


def _symlink_to_dataset(tmp: Path) -> tuple[Path, list[str]]:
    real = write_dataset(tmp / "real", small_arrays(), name="v", samples_per_shard=16)
    link = tmp / "victim"
    link.symlink_to(real, target_is_directory=True)
    return link, []


def _dataset_holding_the_input(tmp: Path) -> tuple[Path, list[str]]:
    d = write_dataset(tmp / "victim", small_arrays(), name="v", samples_per_shard=16)
    np.savez(d / "in.npz", **small_arrays())
    return d, ["--npz", str(d / "in.npz")]


def _input_file_itself(tmp: Path) -> tuple[Path, list[str]]:
    f = tmp / "victim.npz"
    np.savez(f, **small_arrays())
    return f, ["--npz", str(f)]


def _dir_holding_npy_inputs(tmp: Path) -> tuple[Path, list[str]]:
    d = tmp / "victim"
    d.mkdir()
    arrays = small_arrays()
    np.save(d / "x.npy", arrays["x"])
    np.save(d / "y.npy", arrays["y"])
    return d, ["--npy", str(d / "x.npy"), str(d / "y.npy")]


OVERWRITE_CASES: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "plain-directory": _plain_dir,
    "regular-file": _file_target,
    "dataset-plus-foreign-file": _dataset_with_foreign_file,
    "dataset-plus-subdirectory": _dataset_with_subdir,
    "symlink": _symlink_to_dataset,
    "dataset-holding-the-input": _dataset_holding_the_input,
    "the-input-file": _input_file_itself,
    "directory-holding-npy-inputs": _dir_holding_npy_inputs,
}


@pytest.mark.parametrize("case", sorted(OVERWRITE_CASES))
def test_overwrite_refuses_what_it_did_not_create(tmp_path: Path, case: str) -> None:
    target, source = OVERWRITE_CASES[case](tmp_path)
    if not source:
        source = ["--synthetic", "30", "--features", "3"]
    before = tree(tmp_path)
    code, _, err = run_cli("convert", *source, "--out", str(target), "--overwrite")
    assert code == 1
    one_line_error(err, str(target))
    assert tree(tmp_path) == before  # nothing deleted, nothing left behind


def test_out_inside_an_input_folder_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / cls / "1.png")
    before = tree(tmp_path)
    code, _, err = run_cli("convert", "--images", str(tmp_path / "img"),
                           "--out", str(tmp_path / "img" / "shards"))
    assert code == 1
    one_line_error(err, "img")
    assert tree(tmp_path) == before


def test_overwrite_replaces_a_data_tools_dataset_and_only_it(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    old = load_manifest(out)
    (tmp_path / "neighbour.txt").write_text("keep")
    code, _, err = run_cli("convert", "--synthetic", "12", "--features", "3",
                           "--samples-per-shard", "100", "--out", str(out), "--overwrite")
    assert code == 0, err
    new = load_manifest(out)
    assert new.num_samples == 12 and len(new.shards) == 1 and len(old.shards) == 3
    assert sorted(p.name for p in out.iterdir()) == ["ds-00000.h5", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "neighbour.txt"]


def test_an_empty_directory_is_a_free_target(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    code, _, err = synth(tmp_path / "ds")
    assert code == 0, err
    assert load_manifest(tmp_path / "ds").num_samples == 30


def test_write_dataset_overwrite_has_the_same_guard(tmp_path: Path) -> None:
    d = tmp_path / "victim"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match=r"thesis\.tex.*HINT"):
        write_dataset(d, small_arrays(), name="v", samples_per_shard=16, overwrite=True)
    assert (d / "thesis.tex").read_text() == "years of work"


# -- 2. names that become paths are plain file-name prefixes --

BAD_NAMES = ["../x", "/abs/x", "a/b", "", ".", "..", "a\nb", "tab\tname", "nul\x00", ".hidden",
             "a\\b", "x" * 300]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_convert_name_must_be_a_plain_prefix(tmp_path: Path, bad: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = synth(work / "out", "--name", bad)
    assert code == 1
    one_line_error(err, "--name")
    assert list(tmp_path.rglob("*")) == [work]  # nothing written anywhere


@pytest.mark.parametrize("bad", [*BAD_NAMES, "train,train"], ids=repr)
def test_split_names_must_be_plain_names(tmp_path: Path, bad: str) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    before = tree(tmp_path)
    names = bad if "," in bad else f"train,{bad}"
    code, _, err = run_cli("split", str(out), "--names", names)
    assert code == 1
    one_line_error(err, "--names")
    assert tree(tmp_path) == before


def test_default_name_of_an_out_ending_in_dotdot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("convert", "--synthetic", "5", "--features", "2", "--out", "sub/x/..")
    assert code == 0, err
    assert load_manifest(tmp_path / "sub").shards[0].file == "sub-00000.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


# -- 3. concurrent writers never destroy or mix each other's work --


class Racing:
    """A source that, when first read, lets another writer finish into the same target."""

    def __init__(self, inner: ArraySource, rival: Callable[[], Any]) -> None:
        self.inner = inner
        self.num_samples = inner.num_samples
        self.rival: Callable[[], Any] | None = rival

    def specs(self) -> dict[str, ArraySpec]:
        return self.inner.specs()

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if self.rival is not None:
            rival, self.rival = self.rival, None
            rival()
        return self.inner.read(start, stop)


def _rival_write(out: Path, overwrite: bool = False) -> Callable[[], Any]:
    return lambda: write_dataset(
        out, small_arrays(25, seed=9), name="rival", samples_per_shard=10, overwrite=overwrite
    )


def test_two_conversions_into_one_out_keep_the_first_published(tmp_path: Path) -> None:
    from mpi4py import MPI

    out = tmp_path / "ds"

    def rival() -> None:
        convert(MPI.COMM_SELF, ArraySource(small_arrays(25, seed=9)), out, name="rival",
                samples_per_shard=10)

    source = Racing(ArraySource(small_arrays(40)), rival)
    with pytest.raises(DataError, match=r"ds.*HINT"):
        convert(MPI.COMM_SELF, source, out, name="mine", samples_per_shard=10)
    m = load_manifest(out)
    assert m.name == "rival" and m.num_samples == 25 and report.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary left


def test_two_write_datasets_in_one_process_do_not_share_a_temp_dir(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    source = Racing(ArraySource(small_arrays(40)), _rival_write(out))
    with pytest.raises(DataError, match=r"ds.*HINT"):
        write_dataset(out, source, name="mine", samples_per_shard=10)
    assert load_manifest(out).name == "rival" and report.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_overwrite_does_not_replace_a_dataset_published_meanwhile(tmp_path: Path) -> None:
    from mpi4py import MPI

    out = write_dataset(tmp_path / "ds", small_arrays(), name="old", samples_per_shard=16)
    source = Racing(ArraySource(small_arrays(40)), _rival_write(out, overwrite=True))
    with pytest.raises(DataError, match=r"ds.*changed.*HINT"):
        convert(MPI.COMM_SELF, source, out, name="mine", samples_per_shard=10, overwrite=True)
    assert load_manifest(out).name == "rival" and report.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_converting_into_one_out(tmp_path: Path, overwrite: bool) -> None:
    """Real processes, started together: one dataset wins whole, the other fails cleanly."""
    out = tmp_path / "ds"
    if overwrite:
        assert synth(out)[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_tools", "convert", "--synthetic", "3000", "--features",
             "16", "--samples-per-shard", "200", "--seed", str(seed), "--out", str(out),
             *(["--overwrite"] if overwrite else [])],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert "Traceback" not in err, err
        if code:
            assert len(err.strip().splitlines()) == 1 and "HINT" in err, err
            assert any(w in err for w in ("appeared", "changed", "already exists")), err
    m = load_manifest(out)
    assert m.num_samples == 3000 and report.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporaries left


def _split_state(d: Path) -> dict[str, tuple[str, int, str]]:
    """split name -> (file, count, sha) from the manifest, each checked against its file."""
    m = load_manifest(d)
    for name, sp in m.splits.items():
        data = (d / sp.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sp.sha256, f"split {name} file was replaced"
        assert len(np.load(d / sp.file)) == sp.num_samples
    return {k: (v.file, v.num_samples, v.sha256) for k, v in m.splits.items()}


def test_interrupted_resplit_leaves_old_manifest_and_files_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    assert run_cli("split", str(out), "--fractions", "0.5,0.5")[0] == 0
    before = _split_state(out)

    def crash(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt  # a Ctrl-C (or a kill) just before the manifest switch

    monkeypatch.setattr(split, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        run_cli("split", str(out), "--fractions", "0.9,0.1", "--seed", "3")
    assert _split_state(out) == before  # still consistent: old manifest, old files
    assert len(ShardedDataset(out, split="train")) == before["train"][1]


def test_resplit_switches_manifest_then_removes_only_its_old_files(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    assert run_cli("split", str(out), "--fractions", "0.5,0.5")[0] == 0
    old = _split_state(out)
    reader = ShardedDataset(out, split="train", in_memory=False)  # holds the old manifest
    want = reader.read_batch(np.arange(len(reader)))
    (out / "split-mine.npy").write_bytes(b"a user's file, not named by the manifest")
    assert run_cli("split", str(out), "--fractions", "0.8,0.2", "--seed", "5")[0] == 0
    new = _split_state(out)
    assert new["train"][1] == 24 and new["train"][0] != old["train"][0]
    for name in ("train", "test"):
        assert not (out / old[name][0]).exists()  # replaced files are gone
    assert (out / "split-mine.npy").exists()  # what data_tools did not write stays
    got = reader.read_batch(np.arange(len(reader)))  # the old reader still works
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(want, got, strict=True))


def test_concurrent_split_switch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    real = split.write_split
    state = {"rival": True}

    def racing_write_split(directory: Path, name: str, idx: np.ndarray, *rest: Any) -> Any:
        if state.pop("rival", False):
            split.add_splits(out, {"rival": np.arange(5)})  # another split finishes first
        return real(directory, name, idx, *rest)

    monkeypatch.setattr(split, "write_split", racing_write_split)
    code, _, err = run_cli("split", str(out), "--names", "a,b")
    assert code == 1
    one_line_error(err, "manifest.json")
    assert set(_split_state(out)) == {"rival"}  # the rival's split kept, nothing mixed in
    assert not [p for p in out.iterdir() if p.name.startswith(("split-a", "split-b", "."))]


# -- 4. a full disk leaves nothing behind and says what was needed --


def _enospc(*_: Any, **__: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def full_disk_for(monkeypatch: pytest.MonkeyPatch, needle: str) -> Iterator[None]:
    """Make fsync of any file whose name contains ``needle`` fail with ENOSPC."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if needle in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            _enospc()
        real(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        yield


def test_disk_full_while_writing_a_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def create_dataset(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 4:  # the third shard's first array
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    code, _, err = synth(tmp_path / "ds")
    assert code == 1
    one_line_error(err, "ds-00002.h5", "No space left", "bytes", "free")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("needle", ["manifest.json", "ds-00001.h5"])
def test_disk_full_at_fsync_leaves_old_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, needle: str
) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    before = tree(tmp_path)
    with full_disk_for(monkeypatch, needle):
        code, _, err = synth(out, "--overwrite", "--seed", "4")
    assert code == 1
    one_line_error(err, needle, "No space left", "bytes")
    assert tree(tmp_path) == before


def test_disk_full_while_splitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    assert synth(out)[0] == 0
    before = tree(tmp_path)
    with full_disk_for(monkeypatch, "split-"):
        code, _, err = run_cli("split", str(out))
    assert code == 1
    one_line_error(err, "split-train", "No space left", "bytes")
    assert tree(tmp_path) == before


def test_write_atomic_removes_its_temporary_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with full_disk_for(monkeypatch, "out.bin"), pytest.raises(OSError):
        files.write_atomic(tmp_path / "out.bin", b"x" * 100)
    assert list(tmp_path.iterdir()) == []
    assert files.temporary_name(tmp_path / "a") != files.temporary_name(tmp_path / "a")
    assert "needs 100 bytes" in files.space_note(tmp_path / "out.bin", 100)


# -- 6. labels and dtypes are converted explicitly or refused at convert time --

CONVERT_REFUSALS: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    # case: (arrays, extra flags, needles in the error)
    "float-labels": ({"y": np.array([0.0, 1.5, 2.0, 1.0])}, [], ["1.5", "index 1", "'y'"]),
    "nan-labels": ({"y": np.array([0.0, 1.0, np.nan, 1.0])}, [], ["nan", "index 2"]),
    "negative-labels": ({"y": np.array([0, 1, -3, 1])}, [], ["-3", "index 2"]),
    "labels-beyond-classes": ({"y": np.array([0, 1, 2, 7])}, ["--classes", "3"],
                              ["7", "index 3", "3"]),
    "string-labels": ({"y": np.array(["a", "b", "a", "b"])}, [], ["'y'", "<U1"]),
    "2d-labels": ({"y": np.zeros((4, 2), dtype=np.int64)}, [], ["'y'", "(4, 2)"]),
    "nan-features": ({"x": np.array([[0.0], [1.0], [np.inf], [2.0]], dtype=np.float32)}, [],
                     ["inf", "index 2", "'x'"]),
    "float64-overflow": ({"x": np.array([[0.0], [1e300], [2.0], [3.0]])}, [],
                         ["index 1", "'x'", "float32"]),
    "complex-features": ({"x": np.ones((4, 2), dtype=np.complex64)}, [], ["'x'", "complex64"]),
    "object-extra": ({"t": np.array([1, "a", None, 2.0], dtype=object)}, [], ["'t'", "object"]),
    "bad-extra-name": ({"a b/c": np.arange(4)}, [], ["a b/c"]),
    # --vocab: x holds token ids, refused naming sample, position and value
    "token-fractional": ({"x": np.array([[0.0, 1.0], [2.0, 3.5], [4.0, 5.0], [6.0, 7.0]])},
                         ["--vocab", "256"], ["3.5", "sample 1", "position 1", "not an integer"]),
    "token-negative": ({"x": np.array([[0, 1], [2, 3], [4, 5], [-6, 7]])}, ["--vocab", "256"],
                       ["-6", "sample 3", "position 0", "negative", "[0, 256)"]),
    "token-beyond-vocab": ({"x": np.array([[0, 1], [2, 3], [256, 5], [6, 7]])},
                           ["--vocab", "256"], ["256", "sample 2", "position 0", "vocabulary"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_REFUSALS))
def test_convert_refuses_bad_labels_and_features(tmp_path: Path, case: str) -> None:
    override, flags, needles = CONVERT_REFUSALS[case]
    arrays = {"x": np.ones((4, 2), dtype=np.float32), "y": np.array([0, 1, 0, 1]), **override}
    np.savez(tmp_path / "in.npz", **arrays)
    code, _, err = run_cli("convert", "--npz", str(tmp_path / "in.npz"),
                           "--out", str(tmp_path / "ds"), *flags)
    assert code == 1
    one_line_error(err, "in.npz", *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_convert_converts_and_reports(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    y = np.array([0.0, 1.0, 2.0, 1.0, 0.0, 2.0])
    np.savez(tmp_path / "in.npz", x=x, y=y, t=np.arange(6, dtype=np.int32))
    code, out, err = run_cli("convert", "--npz", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "ds"), "--classes", "5")
    assert code == 0, err
    assert "x: float64 -> float32" in out and "y: float64 -> int64" in out
    m = load_manifest(tmp_path / "ds")
    assert (m.arrays["x"].dtype, m.arrays["y"].dtype, m.arrays["t"].dtype) == (
        "float32", "int64", "int32")
    assert m.num_classes == 5  # --classes is kept even when the data holds fewer
    assert "float64 -> float32" in json.dumps(m.params)
    x2, y2 = ShardedDataset(tmp_path / "ds").read_batch(np.arange(6))
    assert np.array_equal(x2.numpy(), x.astype(np.float32)) and y2.tolist() == [0, 1, 2, 1, 0, 2]


def test_convert_vocab_stores_token_ids_as_integers(tmp_path: Path) -> None:
    x = np.array([[0.0, 255.0, 7.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.savez(tmp_path / "in.npz", x=x, y=np.zeros(3, np.int64))
    code, out, err = run_cli("convert", "--npz", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "ds"), "--vocab", "256")
    assert code == 0, err
    assert "x: float64 -> uint8" in out and "token ids in [0, 256)" in out
    m = load_manifest(tmp_path / "ds")
    assert m.arrays["x"].dtype == "uint8" and m.params["vocab"] == 256
    assert report.verify(tmp_path / "ds") == []
    got, _ = ShardedDataset(tmp_path / "ds", tokens=256).read_batch(np.arange(3))
    assert np.array_equal(got.numpy(), x.astype(np.float32))


def test_integer_features_and_small_int_labels_are_widened(tmp_path: Path) -> None:
    arrays = {"x": np.arange(8, dtype=np.uint8).reshape(4, 2), "y": np.array([0, 1, 1, 0],
                                                                              dtype=np.int8)}
    out = write_dataset(tmp_path / "ds", arrays, name="d", samples_per_shard=3)
    m = load_manifest(out)
    assert (m.arrays["x"].dtype, m.arrays["y"].dtype) == ("float32", "int64")
    assert "uint8 -> float32" in m.params["converted"]


def test_csv_nan_features_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\nnan,1\n")
    code, _, err = run_cli("convert", "--csv", str(tmp_path / "d.csv"),
                           "--out", str(tmp_path / "o"))
    assert code == 1
    one_line_error(err, "d.csv", "nan", "index 1")


# -- 7. every console script the package declares starts --


def _scripts() -> list[str]:
    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("script", _scripts())
def test_console_scripts_start(script: str) -> None:
    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"{exe} missing: run pip install -e ."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "Traceback" not in proc.stderr


def test_cli_main_takes_its_arguments_from_sys_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert synth(tmp_path / "ds")[0] == 0
    monkeypatch.setattr(sys, "argv", ["data-tools", "inspect", str(tmp_path / "ds")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    import threading

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    assert cli.main() == 0
    assert "samples: 30 in 3 shards" in capsys.readouterr().out


# -- more of the same kind: inputs that used to end in a traceback or a wrong parse --


def test_negative_seed_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["convert", "--synthetic", "5", "--seed", "-1", "--out", str(tmp_path / "o")],
                 ["split", str(tmp_path), "--seed", "-2"],
                 ["split", str(tmp_path), "--fold", "-1"]):
        with pytest.raises(SystemExit) as info:
            run_cli(*argv)
        assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scalar_npz_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.float32(3), y=np.int64(1))
    code, _, err = run_cli("convert", "--npz", str(tmp_path / "s.npz"), "--out",
                           str(tmp_path / "o"))
    assert code == 1
    one_line_error(err, "s.npz", "'x'")


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "bom.csv").write_text("label,a\n0,1\n1,2\n", encoding="utf-8-sig")
    code, _, err = run_cli("convert", "--csv", str(tmp_path / "bom.csv"), "--out",
                           str(tmp_path / "o"))
    assert code == 0, err
    assert load_manifest(tmp_path / "o").num_samples == 2


def test_unreadable_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "img" / "a").mkdir(parents=True)
    real = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        if self.name == "a":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    code, _, err = run_cli("convert", "--images", str(tmp_path / "img"), "--out",
                           str(tmp_path / "o"))
    assert code == 1
    one_line_error(err, "img", "Permission denied")


def test_split_name_count_mismatch_has_a_hint(tmp_path: Path) -> None:
    assert synth(tmp_path / "ds")[0] == 0
    code, _, err = run_cli("split", str(tmp_path / "ds"), "--names", "a,b,c")
    assert code == 1
    one_line_error(err, "--names")


@pytest.mark.parametrize(
    ("case", "needles"),
    [("short-row", ["line 3", "fields"]), ("header-only", ["no rows"]),
     ("no-readable-image", ["no readable images"])],
)
def test_more_sources_fail_in_one_line(tmp_path: Path, case: str, needles: list[str]) -> None:
    if case == "no-readable-image":
        (tmp_path / "img" / "a").mkdir(parents=True)
        (tmp_path / "img" / "a" / "bad.png").write_bytes(b"not an image")
        argv = ["--images", str(tmp_path / "img"), "--on-error", "skip"]
    else:
        text = "a,b,label\n1,2,0\n3,1\n" if case == "short-row" else "a,b,label\n"
        (tmp_path / "d.csv").write_text(text)
        argv = ["--csv", str(tmp_path / "d.csv")]
    code, _, err = run_cli("convert", *argv, "--out", str(tmp_path / "o"))
    assert code == 1
    one_line_error(err, *needles)
    assert not (tmp_path / "o").exists()
