"""All-reduce benchmark, OSU style: raw mpi4py vs mpitrain tensors vs torch.distributed gloo.

``python -m mpitrain.bench allreduce [-n 2] [--json PATH]`` launches ``mpiexec -n N`` of
itself; every method runs in the same job, interleaved size by size. Time per op is the
slowest rank's mean over a timed loop, the median of ``--reps`` loops run round-robin across
methods (``mt/raw`` compares medians, ``min m/r`` the best loops); bus bandwidth is
``bytes / time * 2(n-1)/n``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.launch import launch_env, mpiexec_command

if TYPE_CHECKING:
    from mpi4py import MPI

SIZES = [4096 * 2**i for i in range(15)]  # 4 KiB ... 64 MiB
METHODS = ("raw", "mpitrain", "mpitrain_async", "mpitrain_talloc", "gloo")


def relaunch(n: int, argv: list[str], timeout: float = 900) -> int:
    """Run ``mpiexec -n N python -m mpitrain.bench ARGV --worker``; return its exit code."""
    cmd = [*mpiexec_command(n), sys.executable, "-m", "mpitrain.bench", *argv, "--worker"]
    try:
        return subprocess.run(cmd, env=launch_env(), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out: {' '.join(cmd)}", file=sys.stderr)
        return 1


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_gloo(comm: MPI.Intracomm) -> None:
    """Collective: start torch.distributed (gloo) on the ranks of ``comm`` (rank 0 hosts)."""
    import torch.distributed as dist
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_host = bool(comm.allreduce(node.size == comm.size, op=MPI.LAND))
    node.Free()
    # across (emulated) nodes rank 0 listens on its host's address, else on loopback
    host = "127.0.0.1" if one_host else socket.gethostbyname(socket.gethostname())
    addr, port = comm.bcast(
        (host, free_port("0.0.0.0" if not one_host else host)) if comm.rank == 0 else None, root=0
    )
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=comm.rank,
        world_size=comm.size,
    )


def machine() -> dict[str, Any]:
    """Describe this machine and MPI for the record."""
    from mpi4py import MPI

    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "python": platform.python_version(),
    }


def _time_loop(comm: MPI.Intracomm, op: Callable[[], None], iters: int) -> float:
    from mpi4py import MPI

    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        op()
    return float(comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))


def _measure(
    comm: MPI.Intracomm, ops: dict[str, Callable[[], None]], iters: int, reps: int
) -> dict[str, list[float]]:
    """Time each op ``reps`` times, round-robin (so machine noise hits all methods alike)."""
    for op in ops.values():
        op()
        op()
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, op in ops.items():
            samples[name].append(_time_loop(comm, op, iters))
    return samples


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: measure every method at every size; rank 0 prints and writes JSON.

    MPI methods are measured first (round-robin per size), gloo afterwards in its own pass so
    its progress threads cannot disturb the MPI numbers.
    """
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from mpitrain.comm.allreduce import allreduce_, iallreduce_

    torch.set_num_threads(1)
    n = comm.size
    sizes = [s for s in SIZES if s <= args.max_bytes]
    loop = args.loop_mb << 20
    rows: list[dict[str, Any]] = [{"bytes": s, "iters": _iters(s, loop)} for s in sizes]

    def record(row: dict[str, Any], samples: dict[str, list[float]]) -> None:
        for name, ts in samples.items():
            t = statistics.median(ts)
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_min_us"] = min(ts) * 1e6
            row[f"{name}_busbw_GBs"] = row["bytes"] / t * 2 * (n - 1) / n / 1e9

    for row in rows:
        count = row["bytes"] // 4
        arr = np.ones(count, dtype=np.float32)
        # like for like: the tensor wraps memory from the same (numpy) allocator as ``arr``;
        # ``talloc`` uses torch's allocator (no huge pages unless THP_MEM_ALLOC_ENABLE=1)
        ten = torch.from_numpy(np.ones(count, dtype=np.float32))
        tal = torch.ones(count, dtype=torch.float32)

        def raw(arr: Any = arr) -> None:
            comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)

        def mt(ten: torch.Tensor = ten) -> None:
            allreduce_(ten, comm, average=False)

        def mt_async(ten: torch.Tensor = ten) -> None:
            iallreduce_(ten, comm, average=False).wait()

        def mt_talloc(tal: torch.Tensor = tal) -> None:
            allreduce_(tal, comm, average=False)

        ops: dict[str, Callable[[], None]] = {
            "raw": raw, "mpitrain": mt, "mpitrain_async": mt_async, "mpitrain_talloc": mt_talloc
        }
        record(row, _measure(comm, ops, row["iters"], args.reps))
    init_gloo(comm)
    for row in rows:
        gt = torch.ones(row["bytes"] // 4, dtype=torch.float32)

        def gloo(gt: torch.Tensor = gt) -> None:
            dist.all_reduce(gt)

        gloo_ops: dict[str, Callable[[], None]] = {"gloo": gloo}
        record(row, _measure(comm, gloo_ops, max(3, row["iters"] // 10), args.reps))
        if comm.rank == 0:
            print(_format_row(row), flush=True)
    dist.destroy_process_group()
    if comm.rank == 0:
        result = {"benchmark": "allreduce", "ranks": n, "machine": machine(), "rows": rows,
                  "reps": args.reps, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _iters(nbytes: int, loop_bytes: int = 2**27) -> int:
    """Calls per timed loop: about ``loop_bytes`` moved per loop, 5..2000 calls."""
    return max(5, min(2000, loop_bytes // nbytes))


def _format_row(row: dict[str, Any]) -> str:
    size = row["bytes"]
    label = f"{size // 2**20}M" if size >= 2**20 else f"{size // 1024}K"
    cells = "".join(
        f"{row[f'{m}_us']:>12.1f}{row[f'{m}_busbw_GBs']:>8.2f}" for m in METHODS
    )
    ratio = row["mpitrain_us"] / row["raw_us"]
    best = row["mpitrain_min_us"] / row["raw_min_us"]
    return f"{label:>6}{cells}{ratio:>9.3f}{best:>9.3f}"


def header() -> str:
    """Table header (time in µs, busbw in GB/s)."""
    cols = "".join(f"{m.replace('mpitrain', 'mt'):>12}{'GB/s':>8}" for m in METHODS)
    return f"{'size':>6}{cols}{'mt/raw':>9}{'min m/r':>9}"


def main(argv: list[str]) -> int:
    """Entry point: parse options, launch the ranks (or be one).

    ``--algo flat,hierarchical`` hands the whole command line to ``bench algo`` (flat vs
    hierarchical side by side at 4 ranks as 2 pretend nodes).
    """
    if any(a == "--algo" or a.startswith("--algo=") for a in argv):
        from mpitrain.bench import algo

        return algo.main(argv)
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench allreduce", description=__doc__)
    p.add_argument("-n", "--ranks", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--reps", type=int, default=7, help="timed loops per point (median)")
    p.add_argument("--max-bytes", type=int, default=SIZES[-1], help="largest message")
    p.add_argument("--loop-mb", type=int, default=128,
                   help="MiB moved per timed loop (lower it on slow links, e.g. 16 at 1 Gbit/s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    print(f"all-reduce float32 sum, {args.ranks} ranks; time per op (us), busbw (GB/s)")
    print(header(), flush=True)
    fwd = [
        "-n", str(args.ranks), "--reps", str(args.reps), "--max-bytes", str(args.max_bytes),
        "--loop-mb", str(args.loop_mb),
    ]
    if args.json:
        fwd += ["--json", str(Path(args.json).resolve())]
    return relaunch(args.ranks, ["allreduce", *fwd])
