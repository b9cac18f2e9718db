"""``python -m mpitrain.bench loader``: HDF5 loader throughput vs raw h5py, RSS, convert speed.

Each measurement runs in a fresh process (so its peak RSS is its own), warm (files in the page
cache) and cold (evicted with ``posix_fadvise(DONTNEED)`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("raw", "sequential", "chunk", "global", "per-sample")


def evict(directory: Path) -> None:
    """Drop the dataset's files from the page cache."""
    for f in directory.glob("*.h5"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(directory: Path) -> None:
    """Read the dataset's files once so that warm rounds find them in the page cache."""
    for f in directory.glob("*.h5"):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collapse rounds: per (cache, mode) the median-MB/s row, with min and max MB/s."""
    out = []
    keys = list(dict.fromkeys((r["cache"], r["mode"]) for r in rows))
    for cache, mode in keys:
        mine = sorted((r for r in rows if (r["cache"], r["mode"]) == (cache, mode)),
                      key=lambda r: r["MB_per_s"])
        row = dict(mine[len(mine) // 2])
        row["rounds"] = len(mine)
        row["MB_per_s_min"] = mine[0]["MB_per_s"]
        row["MB_per_s_max"] = mine[-1]["MB_per_s"]
        row["peak_rss_MB"] = max(r["peak_rss_MB"] for r in mine)
        out.append(row)
    return out


def measure(directory: Path, mode: str, batch: int, limit_batches: int) -> dict[str, Any]:
    """Read the dataset one way; return bytes/s, samples/s and this process's peak RSS."""
    import h5py

    from mpitrain.data import BatchLoader, DistributedSampler, ShardedDataset, load_manifest

    m = load_manifest(directory)
    sample_bytes = sum(
        int(np.dtype(a.dtype).itemsize * np.prod(a.shape, dtype=np.int64))
        for a in m.arrays.values()
    )
    t0 = time.perf_counter()
    samples = 0
    if mode == "raw":
        step = max(1, (64 << 20) // sample_bytes)
        for s in m.shards:
            opts = {"rdcc_nbytes": 0} if m.compression in (None, "none") else {}
            with h5py.File(directory / s.file, "r", **opts) as f:
                for a in range(0, s.num_samples, step):
                    f["x"][a : a + step]
                    f["y"][a : a + step]
                    samples += min(step, s.num_samples - a)
    elif mode == "per-sample":
        ds = ShardedDataset(directory)
        rng = np.random.default_rng(0)
        for i in rng.integers(0, len(ds), limit_batches * 8):
            ds[int(i)]
            samples += 1
    else:
        ds = ShardedDataset(directory)
        shuffle = {"sequential": "none", "chunk": "chunk", "global": "global"}[mode]
        sampler = DistributedSampler(len(ds), 0, 1, shuffle=shuffle, chunk=ds.block_samples)
        loader = BatchLoader(ds, sampler, batch, prefetch=4)
        loader.set_epoch(0)
        for k, b in enumerate(loader):
            samples += len(b.y)
            if mode == "global" and k + 1 >= limit_batches:
                break
    dt = time.perf_counter() - t0
    rss_mb = peak_rss_mb()
    return {
        "mode": mode,
        "samples": samples,
        "seconds": dt,
        "MB_per_s": samples * sample_bytes / dt / 1e6,
        "samples_per_s": samples / dt,
        "peak_rss_MB": rss_mb,
    }


def peak_rss_mb() -> float:
    """Return this process's peak RSS in MB: VmHWM (ru_maxrss survives exec on Linux, so a
    child started by a large parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(directory: Path, mode: str, cold: bool, batch: int, limit: int) -> dict[str, Any]:
    """Measure in a fresh interpreter and return its JSON row."""
    if cold:
        evict(directory)
    cmd = [
        sys.executable,
        "-m",
        "mpitrain.bench.loader",
        "--one",
        mode,
        "--dir",
        str(directory.parent),
        "--batch",
        str(batch),
        "--limit-batches",
        str(limit),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    row["cache"] = "cold" if cold else "warm"
    return row


def convert_speed(base: Path, gb: float, ranks: list[int]) -> list[dict[str, Any]]:
    """Time ``data_tools convert --synthetic`` with 1, 2, 4 ranks; MB/s of shards written."""
    from mpitrain.runtime.launch import launch_env, mpiexec_command

    n = int(gb * 1e9 / (784 * 4 + 8))
    rows = []
    for r in ranks:
        out = base / f"convert-{r}"
        cmd = [
            *mpiexec_command(r),
            sys.executable,
            "-m",
            "data_tools",
            "convert",
            "--synthetic",
            str(n),
            "--features",
            "784",
            "--samples-per-shard",
            "20000",
            "--out",
            str(out),
            "--overwrite",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, check=True)
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.h5"))
        rows.append({"ranks": r, "seconds": dt, "MB_per_s": size / dt / 1e6, "MB": size / 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the loader benchmark; print a table; optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench loader", description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mpitrain-bench-loader"))
    p.add_argument("--gb", type=float, default=0.5, help="dataset size (784 float32 features)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--limit-batches", type=int, default=500, help="for global/per-sample modes")
    p.add_argument("--convert-gb", type=float, default=0.25)
    p.add_argument("--convert-ranks", default="1,2,4")
    p.add_argument("--no-cold", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median)")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    data = a.dir / "data"
    if a.one:
        print(json.dumps(measure(data, a.one, a.batch, a.limit_batches)))
        return 0
    from data_tools.sources import SyntheticSource
    from mpitrain.data.writer import write_dataset

    n = int(a.gb * 1e9 / (784 * 4 + 8))
    if (
        not (data / "manifest.json").exists()
        or json.loads((data / "manifest.json").read_text())["num_samples"] != n
    ):
        print(f"creating {a.gb} GB synthetic dataset ({n} samples) in {data} ...", flush=True)
        a.dir.mkdir(parents=True, exist_ok=True)
        write_dataset(
            data,
            SyntheticSource(n, (784,), 10, 0),
            name="bench",
            samples_per_shard=50_000,
            overwrite=True,
        )
    rows = []
    for cold in [False] if a.no_cold else [False, True]:
        if not cold:
            warm_up(data)
        for _ in range(max(1, a.rounds)):  # modes take turns: machine noise hits all alike
            for mode in MODES:
                rows.append(run_one(data, mode, cold, a.batch, a.limit_batches))
    rows = median_rows(rows)
    raw = {r["cache"]: r["MB_per_s"] for r in rows if r["mode"] == "raw"}
    print(f"\nloader benchmark: {n} samples x 784 float32 ({a.gb} GB), batch {a.batch}, "
          f"median of {max(1, a.rounds)} round-robin rounds")
    print(
        f"{'cache':<6} {'mode':<11} {'MB/s':>9} {'(min-max)':>13} {'samples/s':>11} "
        f"{'vs raw':>7} {'peak RSS MB':>12}"
    )
    for r in rows:
        r["vs_raw"] = r["MB_per_s"] / raw[r["cache"]]
        spread = f"{r['MB_per_s_min']:.0f}-{r['MB_per_s_max']:.0f}"
        print(
            f"{r['cache']:<6} {r['mode']:<11} {r['MB_per_s']:9.0f} {spread:>13} "
            f"{r['samples_per_s']:11.0f} {r['vs_raw']:7.2f} {r['peak_rss_MB']:12.0f}"
        )
    conv = convert_speed(a.dir, a.convert_gb, [int(r) for r in a.convert_ranks.split(",") if r])
    print(f"\ndata_tools convert --synthetic ({a.convert_gb} GB)")
    print(f"{'ranks':>5} {'seconds':>8} {'MB/s':>8}")
    for c in conv:
        print(f"{c['ranks']:>5} {c['seconds']:8.1f} {c['MB_per_s']:8.0f}")
    if a.json:
        a.json.write_text(json.dumps({"loader": rows, "convert": conv, "gb": a.gb}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
