"""Multi-rank data: parallel convert equals serial convert; ranks read exactly their samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi


def _content(directory: Path) -> dict[str, object]:
    m = json.loads((directory / "manifest.json").read_text())
    m.pop("params")
    m.pop("name")
    for s in m["shards"]:  # shard names carry the dataset name; checksums carry the bytes
        s["file"] = s["file"].split("-")[-1]
    return m  # type: ignore[no-any-return]


def test_parallel_convert_equals_serial_and_ranks_read_their_part(mpirun, tmp_path: Path) -> None:
    args = [
        "--synthetic",
        "5000",
        "--features",
        "6x6",
        "--samples-per-shard",
        "700",
        "--compression",
        "lzf",
    ]
    mpirun(1, ["-m", "data_tools", "convert", *args, "--out", str(tmp_path / "one")])
    proc = mpirun(4, ["-m", "data_tools", "convert", *args, "--out", str(tmp_path / "four")])
    assert "samples: 5000 in 8 shards" in proc.stdout
    assert _content(tmp_path / "one") == _content(tmp_path / "four")
    out = mpirun(3, ["data_ranks.py", str(tmp_path / "four")])
    assert "data_ranks OK" in out.stdout and "global: 5000 samples, each exactly once" in out.stdout


def test_convert_failure_leaves_nothing(mpirun, tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    import numpy as np

    np.savez(bad, features=np.zeros((10, 2)), y=np.zeros(10))
    proc = mpirun(
        2,
        ["-m", "data_tools", "convert", "--npz", str(bad), "--out", str(tmp_path / "out")],
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0 and "has no array 'x'" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
