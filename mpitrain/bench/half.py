"""Half-precision gradient sums: the user-defined MPI op vs allgather + float32 reduction.

    python -m mpitrain.bench half [-n 2] [--sizes 256K,1M,4M,16M] [--json PATH]

MPI has no bfloat16 sum and only MPICH a (slow) float16 one, so a compressed bucket needs one
of two designs: ``op`` — ``Allreduce`` of the 16-bit buffer with a commutative user-defined
``MPI.Op`` that adds with torch (what mpitrain ships, ``mpitrain.comm.allreduce``); ``gather``
— ``Allgather`` every rank's 16-bit buffer, then sum the N copies in float32 and round once.
Both run side by side in one job (round-robin, median); ``float32`` is the uncompressed
all-reduce of the same element count, for reference. Also reports the largest deviation of
each result from the exact float64 sum, in units of the 16-bit format's spacing at 1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.bench.algo import human, parse_size
from mpitrain.bench.allreduce import _measure, relaunch
from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
    from mpi4py import MPI

DTYPES = ("float16", "bfloat16")


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: time op / gather / float32 per size and dtype; rank 0 writes the JSON."""
    import torch

    from mpitrain.comm.allreduce import allreduce_, numpy_view

    torch.set_num_threads(1)
    n = comm.size
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        eps = float(torch.finfo(dtype).eps)
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            count = size // 2  # 16-bit elements
            g = torch.Generator().manual_seed(comm.rank)
            src = torch.randn(count, generator=g).to(dtype)
            half = src.clone()
            gathered = torch.empty(n, count, dtype=dtype)
            f32 = src.float()

            def op(half: torch.Tensor = half, src: torch.Tensor = src) -> None:
                half.copy_(src)
                allreduce_(half, comm, average=False)

            def gather(gathered: torch.Tensor = gathered, src: torch.Tensor = src,
                       half: torch.Tensor = half) -> None:
                comm.Allgather(numpy_view(src), numpy_view(gathered))
                half.copy_(gathered.float().sum(0))

            def full(f32: torch.Tensor = f32) -> None:
                allreduce_(f32, comm, average=False)

            ops: dict[str, Callable[[], None]] = {"op": op, "gather": gather, "float32": full}
            iters = max(3, min(200, (32 << 20) // size))
            samples = _measure(comm, ops, iters, args.reps)
            exact = torch.from_numpy(
                sum(comm.allgather(src.double().numpy()))  # type: ignore[arg-type]
            )
            errs = {}
            for name in ("op", "gather"):
                ops[name]()
                errs[name] = float((half.double() - exact).abs().max()) / eps
            row: dict[str, Any] = {"dtype": dtype_name, "bytes": size, "ranks": n}
            for name, ts in samples.items():
                row[f"{name}_us"] = statistics.median(ts) * 1e6
            row.update({f"{k}_max_err_eps": v for k, v in errs.items()})
            rows.append(row)
    if comm.rank == 0:
        print(f"half-precision sum, {n} ranks; us per op (median of {args.reps}); "
              "max error in eps at 1.0")
        print(f"{'dtype':<9} {'size':>6} {'op us':>9} {'gather us':>10} {'fp32 us':>9} "
              f"{'gather/op':>9} {'op err':>7} {'gather err':>10}")
        for r in rows:
            print(f"{r['dtype']:<9} {human(r['bytes']):>6} {r['op_us']:>9.1f} "
                  f"{r['gather_us']:>10.1f} {r['float32_us']:>9.1f} "
                  f"{r['gather_us'] / r['op_us']:>9.2f} {r['op_max_err_eps']:>7.1f} "
                  f"{r['gather_max_err_eps']:>10.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"benchmark": "half", "rows": rows}, indent=1))
    return 0


def main(argv: list[str]) -> int:
    """Entry point: launch the ranks (or be one)."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench half", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--sizes", default="256K,1M,4M,16M", help="bytes of 16-bit gradients")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    fwd = ["half", "--sizes", args.sizes, "--dtypes", args.dtypes, "--reps", str(args.reps)]
    if args.json:
        fwd += ["--json", str(Path(args.json).resolve())]
    return relaunch(args.ranks, fwd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
