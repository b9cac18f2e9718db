"""All-reduce algorithms side by side: flat vs hierarchical (both variants), host or staged.

    python -m mpitrain.bench algo --algo flat,hierarchical --ranks 4 --ranks-per-node 2
    python -m mpitrain.bench.algo ...            (same, without the bench dispatcher)

Without ``--worker`` it launches itself under ``mpiexec -n RANKS`` with
``MPITRAIN_RANKS_PER_NODE`` set (pretend nodes on one machine); inside a job launched by you
(``srun``/``mpiexec ... --worker``) it measures on the real node layout. Times are the slowest
rank's mean per call over ``--iters`` calls, median of ``--reps`` repetitions; bus bandwidth
follows nccl-tests (``2(n-1)/n * bytes / time``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.comm.reducer import Reducer
    from mpitrain.runtime.world import World

SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4K`` / ``16M`` / ``1024`` -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in SUFFIX:
        return int(float(text[:-1]) * SUFFIX[text[-1]])
    return int(text)


def human(nbytes: int) -> str:
    """Bytes as ``4K``/``16M``."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def parser() -> argparse.ArgumentParser:
    """The command line of ``bench algo``."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench algo", description=__doc__)
    p.add_argument("--algo", default="flat,hierarchical", help="comma list: flat,hierarchical")
    p.add_argument("--variants", default="reduce_bcast,rs_ag", help="hierarchical variants")
    p.add_argument("--sizes", default="4K,64K,1M,4M,16M,64M", help="message sizes (bytes)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2, help="pretend nodes (0: real)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one rank per GPU)")
    p.add_argument("--path", default="host", help="comma list of host,staged,cuda-aware")
    p.add_argument(
        "--calls", default="blocking", help="comma list: blocking (allreduce_), nonblocking "
        "(iallreduce_ then wait, as the overlapped engine calls it)"
    )  # fmt: skip
    p.add_argument("--iters", type=int, default=0, help="calls per repetition (0: by size)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="write the rows here (rank 0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this benchmark under mpiexec with pretend nodes; returns mpiexec's exit code."""
    from mpitrain.runtime.launch import launch_env, mpiexec_command

    extra = {}
    if args.ranks_per_node > 0:
        extra["MPITRAIN_RANKS_PER_NODE"] = str(args.ranks_per_node)
    cmd = [*mpiexec_command(args.ranks), sys.executable, "-m", "mpitrain.bench.algo"]
    cmd += [*argv, "--worker"]
    root = Path(__file__).resolve().parents[2]
    child = launch_env(extra)
    child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), child.get("PYTHONPATH")]))
    return subprocess.run(cmd, env=child, check=False).returncode


def reducers(world: World, args: argparse.Namespace) -> list[tuple[str, str, Reducer]]:
    """Collective: (algorithm label, path, reducer) for every combination asked for."""
    from mpitrain.comm.cuda_aware import CudaAwareReducer, DirectReducer
    from mpitrain.comm.hierarchical import HierarchicalReducer
    from mpitrain.comm.reducer import FlatReducer
    from mpitrain.comm.staged import StagedReducer

    out: list[tuple[str, str, Reducer]] = []
    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    paths = [p.strip() for p in args.path.split(",") if p.strip()]
    for path in paths:
        for algo in algos:
            made: list[tuple[str, Reducer]] = []
            if algo == "flat":
                flat = (
                    DirectReducer(world.comm.Dup())
                    if path == "cuda-aware"
                    else FlatReducer(world.comm.Dup(), overlap=False)
                )
                made.append(("flat", flat))
            elif algo == "hierarchical":
                for v in args.variants.split(","):
                    made.append((f"hier[{v}]", HierarchicalReducer.create(world, variant=v)))
            else:
                raise SystemExit(f"unknown --algo {algo!r} (flat, hierarchical)")
            for label, r in made:
                if path == "staged":
                    r = StagedReducer(r)
                elif path == "cuda-aware":
                    r = CudaAwareReducer(r)
                elif path != "host":
                    raise SystemExit(f"unknown --path {path!r} (host, staged, cuda-aware)")
                out.append((label, path, r))
    return out


def measure(
    comm: MPI.Intracomm, r: Reducer, t: Any, iters: int, reps: int, *, blocking: bool = True
) -> float:
    """Collective: median over reps of the slowest rank's mean seconds per all-reduce."""
    from mpi4py import MPI

    def once() -> None:
        if blocking:
            r.allreduce_(t, average=False)
        else:
            r.iallreduce_(t, average=False).wait()

    for _ in range(2):
        once()
    times = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        if t.device.type == "cuda":
            import torch

            torch.cuda.synchronize(t.device)
        dt = (time.perf_counter() - t0) / iters
        times.append(float(comm.allreduce(dt, op=MPI.MAX)))
    return statistics.median(times)


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Measure every (size, algorithm, path); rank 0 prints the table and writes JSON."""
    import torch
    from mpi4py import MPI

    from mpitrain.runtime.world import World

    world = World.create(comm)
    device = torch.device("cpu")
    if args.device == "cuda":
        from mpitrain.runtime.device import bind_device

        device = bind_device(world, "cuda")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    combos = reducers(world, args)
    n = world.size
    for size in sizes:
        t = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        iters = args.iters or max(3, min(200, (64 << 20) // max(size, 1)))
        for label, path, r in combos:
            for calls in args.calls.split(","):
                sec = measure(world.comm, r, t, iters, args.reps, blocking=calls == "blocking")
                busbw = 2 * (n - 1) / n * t.numel() * 4 / sec / 1e9
                name = path if calls == "blocking" else f"{path}/nb"
                rows.append(
                    {"bytes": t.numel() * 4, "algo": label, "path": name, "us": sec * 1e6,
                     "busbw_GBps": busbw}
                )  # fmt: skip
    if world.rank == 0:
        meta = {
            "ranks": n,
            "nodes": world.num_nodes,
            "ranks_per_node": world.local_size,
            "device": str(device),
            "mpi": MPI.Get_library_version().splitlines()[0],
            "host": world.hostname,
        }
        print_table(rows, meta)
        if args.json is not None:
            tmp = args.json.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, args.json)
    world.free()
    return 0


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Print one line per size: time per call of each algorithm and which wins."""
    cols = list(dict.fromkeys(f"{r['algo']}/{r['path']}" for r in rows))
    print(
        f"# all-reduce, {meta['ranks']} ranks as {meta['nodes']} node(s) x "
        f"{meta['ranks_per_node']}, {meta['device']}, {meta['mpi']}"
    )
    print(f"{'size':>6} " + " ".join(f"{c + ' us':>26}" for c in cols) + "  fastest")
    for size in dict.fromkeys(r["bytes"] for r in rows):
        mine = {f"{r['algo']}/{r['path']}": r for r in rows if r["bytes"] == size}
        best = min(mine, key=lambda c: mine[c]["us"])
        cells = " ".join(
            f"{mine[c]['us']:>14.1f} ({mine[c]['busbw_GBps']:5.2f} GB/s)" for c in cols
        )
        print(f"{human(size):>6} {cells}  {best}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bench algo``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(args_list)
    if not args.worker:
        return launch(args, args_list)
    return run_mpi(lambda comm: worker(args, comm))


if __name__ == "__main__":
    sys.exit(main())
