"""Shards on disk: round trips, coalesced reads, loader, splits, verify and bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_tools import report, sources, split
from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest
from mpitrain.data.writer import chunk_samples, write_dataset
from mpitrain.errors import DataError


@pytest.fixture()
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.random((230, 3, 4), dtype=np.float32),
        "y": rng.integers(0, 5, 230),
        "t": np.arange(230)[::-1].copy(),
    }


@pytest.fixture()
def ds_dir(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    return write_dataset(
        tmp_path / "ds",
        arrays,
        name="toy",
        samples_per_shard=64,
        splits={"test": np.arange(0, 230, 10)},
    )


def test_manifest_round_trip(ds_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    m = load_manifest(ds_dir)
    assert m.num_samples == 230 and [s.num_samples for s in m.shards] == [64, 64, 64, 38]
    assert m.arrays["x"].shape == (3, 4) and m.arrays["x"].dtype == "float32"
    assert sum(m.class_counts.values()) == 230 and m.num_classes == 5
    assert m.shards[0].file == "toy-00000.h5"
    assert not list(ds_dir.parent.glob(".*tmp"))
    with h5py.File(ds_dir / "toy-00000.h5") as f:
        assert f["x"].chunks[0] == m.chunk_samples


@pytest.mark.parametrize("in_memory", [False, True])
def test_reads_equal_source_in_any_order(
    ds_dir: Path, arrays: dict[str, np.ndarray], in_memory: bool
) -> None:
    ds = ShardedDataset(ds_dir, in_memory=in_memory)
    assert ds.in_memory is in_memory
    idx = np.random.default_rng(1).permutation(230)[:77]
    idx = np.concatenate([idx, idx[:3], np.arange(100, 140), [120, 120]])  # duplicates, runs
    for cached in (False, True):  # coalesced slices / direct runs + LRU blocks
        x, y = ds.read_batch(idx, cached=cached)
        assert np.array_equal(x.numpy(), arrays["x"][idx]) and np.array_equal(
            y.numpy(), arrays["y"][idx]
        )
    test = ShardedDataset(ds_dir, split="test")
    assert len(test) == 23 and np.array_equal(test[2][0].numpy(), arrays["x"][20])
    clone = pickle.loads(pickle.dumps(ds))  # picklable, reopens lazily
    assert np.array_equal(clone[5][0].numpy(), arrays["x"][5])


@pytest.mark.parametrize("in_memory", [False, True])
def test_loader_matches_sampler_and_tracks_consumed(
    ds_dir: Path, arrays: dict[str, np.ndarray], in_memory: bool
) -> None:
    ds = ShardedDataset(ds_dir, in_memory=in_memory)
    sampler = DistributedSampler(len(ds), 1, 3, seed=4)
    loader = BatchLoader(ds, sampler, 16, prefetch=3)
    loader.set_epoch(0)
    expected = list(sampler.batches(16))
    got = []
    for i, batch in enumerate(loader):
        got.append(batch)
        if i == 1:
            assert loader.state_dict()["position"] == 2 * 16 * 3  # consumed, not prefetched
            break
    for (idx, mask), batch in zip(expected, got, strict=False):
        assert np.array_equal(batch.x.numpy(), arrays["x"][idx])
        assert np.array_equal(batch.mask.numpy(), mask)
    assert len(loader) == len(expected) - 2


@pytest.mark.parametrize("shuffle", ["none", "chunk", "global"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_grouped_reads_equal_batch_by_batch(
    ds_dir: Path, arrays: dict[str, np.ndarray], shuffle: str, prefetch: int
) -> None:
    """Reading several batches per call (views of one read) hands out exactly the same batches
    as reading one batch per call, for every shuffle mode, and the state counts batches."""
    ds = ShardedDataset(ds_dir, in_memory=False)  # the HDF5 read path (tiny data: RAM default)
    batch_bytes = 7 * ds.sample_bytes
    runs = []
    for read_ahead in (1, 5 * batch_bytes, 1 << 30):  # 1 batch, 5 batches, whole epoch
        sampler = DistributedSampler(len(ds), 1, 2, seed=3, shuffle=shuffle, chunk=8)
        loader = BatchLoader(ds, sampler, 7, prefetch=prefetch, read_ahead_bytes=read_ahead)
        loader.set_epoch(1)
        want = list(sampler.batches(7))
        got = []
        for k, b in enumerate(loader):
            got.append((b.x.numpy().copy(), b.y.numpy().copy(), b.mask.numpy().copy()))
            assert loader.state_dict()["position"] == min(230, (k + 1) * 7 * 2)
        assert len(got) == len(want)
        for (idx, mask), (x, y, m) in zip(want, got, strict=True):
            assert np.array_equal(x, arrays["x"][idx]) and np.array_equal(y, arrays["y"][idx])
            assert np.array_equal(m, mask)
        runs.append(got)
    for other in runs[1:]:
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(runs[0], other, strict=True))


def test_hdf5_driver_checks() -> None:
    from mpitrain.data.parallel_io import check_driver, h5py_has_mpi
    from mpitrain.errors import ConfigError

    check_driver("posix", 2, 0, 3)
    with pytest.raises(ConfigError, match="unknown"):
        check_driver("lustre", 2, 3, 3)
    if not h5py_has_mpi():
        with pytest.raises(ConfigError, match=r"no MPI support.*HINT.*HDF5_MPI=ON"):
            check_driver("mpio", 0, 3, 3)
    else:
        check_driver("mpio", 0, 0, 3)
        with pytest.raises(ConfigError, match="MPI_THREAD_MULTIPLE"):
            check_driver("mpio", 2, 2, 3)


def test_adopted_files_are_read(ds_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Files opened elsewhere (the MPI-IO path) are what reads go through."""
    ds = ShardedDataset(ds_dir, in_memory=False)
    files = {i: h5py.File(ds_dir / s.file, "r") for i, s in enumerate(ds.manifest.shards)}
    ds.adopt_files(files)
    x, _ = ds.read_batch(np.arange(60, 70))
    assert np.array_equal(x.numpy(), arrays["x"][60:70])
    assert all(ds._files[i] is f for i, f in files.items())
    ds.close()


def test_splits(tmp_path: Path, ds_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    y = arrays["y"]
    parts = split.stratified_split(y, [0.7, 0.3], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(230))
    for cls in np.unique(y):
        want = (y == cls).sum() * 0.7
        assert abs((y[parts[0]] == cls).sum() - want) <= 1
    folds = [split.kfold_split(230, 5, i, 0)[1] for i in range(5)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(230))
    early, late = split.time_split(arrays["t"], [0.8, 0.2])
    assert arrays["t"][early].max() <= arrays["t"][late].min()
    split.add_splits(ds_dir, {"train": parts[0]})
    assert len(ShardedDataset(ds_dir, split="train")) == len(parts[0])
    assert "test" in load_manifest(ds_dir).splits  # earlier splits kept


def test_verify_catches_flipped_byte(ds_dir: Path) -> None:
    assert report.verify(ds_dir) == []
    shard = ds_dir / "toy-00002.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = report.verify(ds_dir)
    assert len(problems) == 1 and "toy-00002.h5" in problems[0] and "checksum" in problems[0]
    with pytest.raises(DataError, match="checksum"):
        ShardedDataset(ds_dir, verify=True)


def test_bad_inputs_name_file_and_hint(tmp_path: Path, ds_dir: Path) -> None:
    def fails(path: Path, needle: str) -> None:
        with pytest.raises(DataError) as info:
            ShardedDataset(path)
        assert needle in str(info.value) and "HINT" in str(info.value)

    fails(tmp_path / "missing", "does not exist")
    raw = json.loads((ds_dir / "manifest.json").read_text())
    for bad_name in ("../../etc/passwd", "/etc/passwd"):
        evil = tmp_path / f"evil{len(bad_name)}"
        evil.mkdir()
        (evil / "manifest.json").write_text(
            json.dumps(
                {**raw, "shards": [{**raw["shards"][0], "file": bad_name}], "num_samples": 64}
            )
        )
        fails(evil, "outside the dataset")
    (ds_dir / "toy-00003.h5").rename(tmp_path / "moved.h5")
    fails(ds_dir, "toy-00003.h5' is missing")
    (tmp_path / "moved.h5").rename(ds_dir / "toy-00003.h5")
    with pytest.raises(DataError, match=r"no split 'val'"):
        ShardedDataset(ds_dir, split="val")
    with h5py.File(ds_dir / "toy-00001.h5", "r+") as f:
        del f["x"]
        f["x"] = np.zeros((64, 3, 5), dtype=np.float32)
    fails(ds_dir, "manifest says (64, 3, 4)")


def test_trainer_facing_bad_inputs(ds_dir: Path) -> None:
    """Not-JSON manifest, shard without x, wrong dtype, checksum at load with verify=True."""
    good = (ds_dir / "manifest.json").read_text()
    (ds_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json' is not valid JSON.*HINT"):
        ShardedDataset(ds_dir)
    (ds_dir / "manifest.json").write_text(good)
    shard = ds_dir / "toy-00002.h5"
    raw = bytearray(shard.read_bytes())
    raw[-200] ^= 0x01
    shard.write_bytes(bytes(raw))
    ShardedDataset(ds_dir)  # shapes still match: only verify=True reads the bytes
    with pytest.raises(DataError, match=r"toy-00002\.h5' fails its SHA-256.*HINT"):
        ShardedDataset(ds_dir, verify=True)
    with h5py.File(ds_dir / "toy-00001.h5", "r+") as f:
        x = f["x"][...]
        del f["x"]
        f["x"] = x.astype(np.float64)
    with pytest.raises(DataError, match=r"toy-00001\.h5' dataset 'x' is .*float64.*float32"):
        ShardedDataset(ds_dir)
    with h5py.File(ds_dir / "toy-00001.h5", "r+") as f:
        del f["x"]
    with pytest.raises(DataError, match=r"toy-00001\.h5' has no dataset 'x'.*HINT"):
        ShardedDataset(ds_dir)


def test_writer_refuses_and_overwrites(
    tmp_path: Path, ds_dir: Path, arrays: dict[str, np.ndarray]
) -> None:
    with pytest.raises(DataError, match="already exists"):
        write_dataset(ds_dir, arrays, name="toy", samples_per_shard=64)
    write_dataset(
        ds_dir,
        {"x": arrays["x"][:10], "y": arrays["y"][:10]},
        name="toy",
        samples_per_shard=64,
        overwrite=True,
    )
    assert load_manifest(ds_dir).num_samples == 10 and not (ds_dir / "toy-00001.h5").exists()
    with pytest.raises(DataError, match="no samples"):
        write_dataset(
            tmp_path / "e", {"x": np.zeros((0, 2)), "y": np.zeros(0)}, name="e", samples_per_shard=4
        )
    assert chunk_samples(784 * 4 + 8, 50_000) == (1 << 20) // (784 * 4 + 8)


def test_sources(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("a,b,label\n1,2,cat\n3,4,dog\n")
    src = sources.from_csv(csv_path, "label")
    assert src.read(0, 2)["x"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and src.read(0, 2)[
        "y"
    ].tolist() == [0, 1]
    csv_path.write_text("a,b,label\n1,x2,0\n")
    with pytest.raises(DataError, match="line 2: column 'b' is not numeric"):
        sources.from_csv(csv_path, "label")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.new("RGB", (6, 6), color=(10, 20, 30)).save(tmp_path / "img" / cls / "1.png")
    (tmp_path / "img" / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png"):
        sources.from_images(tmp_path / "img", None, "fail")
    imgs = sources.from_images(tmp_path / "img", 4, "skip")
    assert imgs.read(0, 2)["x"].shape == (2, 4, 4, 3)
    syn = sources.SyntheticSource(10_000, (7,), 3, seed=1)
    whole = syn.read(0, 10_000)
    assert np.array_equal(syn.read(4000, 4200)["x"], whole["x"][4000:4200])
    assert sources.from_sklearn("iris").num_samples == 150
