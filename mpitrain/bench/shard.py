"""Sharded data parallelism: memory per rank and step time, replicas vs ZeRO stages vs torch.

    python -m mpitrain.bench shard [-n 2] [--widths 1024,4096,4096,1024] [--steps 5] [--json P]
    python -m mpitrain.bench shard --model transformer [--dim 512 --layers 8 --seq 64]

One ``mpiexec`` job per method (so each reports its own peak RSS), same MLP, batch, data and
Adam on every method:

- ``replicas``: :class:`mpitrain.DataParallel` + ``torch.optim.Adam`` (every rank holds all);
- ``zero1`` / ``zero2``: :class:`mpitrain.ShardedDataParallel` stage 1 / 2, Adam over the shards;
- ``torch-zero``: torch ``DistributedDataParallel`` (gloo) + ``ZeroRedundancyOptimizer(Adam)``.

Memory is counted from the tensors themselves on each rank (parameters, gradients, optimizer
state; ``+transient`` adds stage 2's peak of per-bucket full gradient buffers alive at once)
plus the process's peak RSS.
Step time is the median of ``--steps`` timed steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.bench.allreduce import init_gloo, relaunch
from mpitrain.runtime.abort import run_mpi

if TYPE_CHECKING:
    from mpi4py import MPI

METHODS = ("replicas", "zero1", "zero2", "zero3", "torch-zero", "torch-fsdp2")


def _bytes(tensors: Any) -> int:
    import torch

    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _state_tensors(opt: Any) -> list[Any]:
    return [v for st in opt.state.values() for v in st.values()]


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: train ``args.method`` for warm-up + timed steps; rank 0 writes one row."""
    import torch
    from mpi4py import MPI
    from torch import nn

    cgroup = None
    if args.memory_budget_mb:  # before the model exists: the kernel counts all of it
        from mpitrain.bench.budget import enter_budget

        cgroup = enter_budget(int(args.memory_budget_mb * 2**20), args.budget_tag, comm.rank)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net, x, y = build_model(args, comm.rank)
    numel = sum(p.numel() for p in net.parameters())
    method = args.method
    zero, _, algo = method.partition(":")  # zero2:hierarchical = over the hierarchical transport
    progress = "thread" if algo == "thread" else "poll"  # zero3:thread = on comm threads
    if zero in ("zero1", "zero2", "zero3"):
        from mpitrain.grad.zero.wrapper import ShardedDataParallel

        sdp = ShardedDataParallel(net, comm=comm, stage=int(zero[-1]), bucket_mb=args.bucket_mb,
                                  algo="flat" if algo in ("", "thread") else algo,
                                  progress=progress)
        opt = torch.optim.Adam(sdp.parameters(), lr=1e-4)

        def step() -> None:
            nn.functional.mse_loss(sdp(x), y).backward()  # type: ignore[no-untyped-call]
            sdp.synchronize()
            sdp.step(opt)
            sdp.zero_grad()

        def memory() -> dict[str, int]:
            return sdp.memory_bytes(opt)
    elif method == "replicas":
        from mpitrain.grad import DataParallel

        dp = DataParallel(net, comm=comm, bucket_mb=args.bucket_mb)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad()
            nn.functional.mse_loss(dp(x), y).backward()  # type: ignore[no-untyped-call]
            dp.synchronize()
            opt.step()

        def memory() -> dict[str, int]:
            return {"parameters": _bytes(net.parameters()),
                    "gradients": _bytes(dp.engine.plan.buffers.values()),
                    "optimizer": _bytes(_state_tensors(opt))}
    elif method == "torch-fsdp2":
        step, memory = _fsdp2(net, x, y, comm)
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        init_gloo(comm)
        ddp = DistributedDataParallel(net, bucket_cap_mb=args.bucket_mb)
        zro = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=1e-4)

        def step() -> None:
            zro.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()  # type: ignore[no-untyped-call]
            zro.step()

        def memory() -> dict[str, int]:
            grads = [p.grad for p in net.parameters()]
            return {"parameters": _bytes(net.parameters()),
                    "gradients": _bytes(grads),  # DDP's buckets alias the grads
                    "optimizer": _bytes(_state_tensors(zro.optim))}
    times = []
    for i in range(2 + args.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if i >= 2:
            times.append(comm.allreduce(dt, op=MPI.MAX))
    mem = memory()
    model_state = mem["parameters"] + mem["gradients"] + mem["optimizer"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    charged = {}
    if cgroup is not None:  # what the kernel charged this rank (the budget's measure)
        from mpitrain.bench.budget import peak_usage

        charged = {"cgroup_peak": peak_usage(cgroup) or 0}
    per_rank = comm.gather({**mem, "model_state": model_state, "peak_rss": rss, **charged},
                           root=0)
    if comm.rank == 0:
        assert per_rank is not None
        row = {"method": method, "model": args.model, "ranks": comm.size, "numel": numel,
               "batch": args.batch,
               "step_ms": statistics.median(times) * 1e3,
               "step_ms_all": [t * 1e3 for t in times],
               **{k: max(r[k] for r in per_rank) for k in per_rank[0]}}
        Path(args.out).write_text(json.dumps(row))
    if method in ("torch-zero", "torch-fsdp2"):
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def build_model(args: argparse.Namespace, rank: int) -> tuple[Any, Any, Any]:
    """The benchmark's model and this rank's batch: an MLP of ``--widths``, or a stack of
    ``--layers`` transformer encoder layers of width ``--dim`` on (batch, ``--seq``, dim)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1 + rank)
    if args.model == "transformer":
        d = args.dim
        net: nn.Module = nn.Sequential(*(
            nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True)
            for _ in range(args.layers)))
        x = torch.randn(args.batch, args.seq, d, generator=g)
        return net, x, torch.randn(args.batch, args.seq, d, generator=g)
    widths = [int(w) for w in args.widths.split(",")]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    x = torch.randn(args.batch, widths[0], generator=g)
    return net, x, torch.randn(args.batch, widths[-1], generator=g)


def _fsdp2(net: Any, x: Any, y: Any, comm: MPI.Intracomm) -> tuple[Any, Any]:
    """torch FSDP2 (``fully_shard`` per layer, then the root) over gloo on the CPU."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    init_gloo(comm)
    mesh = init_device_mesh("cpu", (comm.size,))
    for layer in net:
        if any(True for _ in layer.parameters()):  # the same units as ZeRO-3's
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()

    def local(ts: Any) -> list[Any]:
        return [t.to_local() if isinstance(t, DTensor) else t for t in ts if t is not None]

    def memory() -> dict[str, int]:
        return {"parameters": _bytes(local(net.parameters())),
                "gradients": _bytes(local(p.grad for p in net.parameters())),
                "optimizer": _bytes(local(_state_tensors(opt)))}

    return step, memory


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(rows: list[dict[str, Any]]) -> None:
    """Print the side-by-side table (ratios against replicas)."""
    base = next((r for r in rows if r["method"] == "replicas"), rows[0])
    first = rows[0]
    print(f"{first.get('model', 'mlp')} {first['numel'] / 1e6:.1f}M params, Adam, "
          f"{first['ranks']} ranks, batch "
          f"{rows[0]['batch']}/rank; MiB per rank (max over ranks), step ms median")
    print(f"{'method':<18} {'params':>7} {'grads':>7} {'optim':>7} {'model':>7} {'of repl':>7} "
          f"{'+transient':>10} {'rss':>7} {'step ms':>8} {'vs repl':>7}"
          + (f" {'charged':>9}" if any("cgroup_peak" in r for r in rows) else ""))
    for r in rows:
        peak = (r["model_state"] + r.get("gradients_transient_peak", 0)
                + r.get("parameters_transient_peak", 0))
        print(f"{r['method']:<18} {_mib(r['parameters']):>7} {_mib(r['gradients']):>7} "
              f"{_mib(r['optimizer']):>7} {_mib(r['model_state']):>7} "
              f"{r['model_state'] / base['model_state']:>7.2f} {_mib(peak):>10} "
              f"{_mib(r['peak_rss']):>7} {r['step_ms']:>8.1f} "
              f"{r['step_ms'] / base['step_ms']:>7.2f}"
              + (f" {_mib(r['cgroup_peak']):>9}" if "cgroup_peak" in r else ""))


def main(argv: list[str]) -> int:
    """Entry point: one job per method, then the table (and JSON)."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--widths", default="1024,4096,4096,1024", help="MLP layer widths")
    p.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    p.add_argument("--dim", type=int, default=512, help="transformer width")
    p.add_argument("--layers", type=int, default=8, help="transformer layers")
    p.add_argument("--seq", type=int, default=64, help="transformer sequence length")
    p.add_argument("--batch", type=int, default=32, help="samples per rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--memory-budget-mb", type=float, default=0.0,
                   help="per-rank memory limit enforced by a cgroup (root); a method that "
                   "needs more is killed by the kernel and reported as such")
    p.add_argument("--budget-tag", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    for method in args.methods.split(","):
        base, _, algo = method.partition(":")
        if base not in METHODS or (algo and (not base.startswith("zero") or algo not in (
                "flat", "hierarchical", "auto", "thread"))):
            p.error(f"--methods: {method!r} is unknown; use {', '.join(METHODS)} "
                    "(zero1-3 also as zeroK:hierarchical or zeroK:thread)")
    rows, killed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = Path(tmp) / f"{method}.json"
            fwd = ["shard", "--method", method, "--out", str(out), "--widths", args.widths,
                   "--model", args.model, "--dim", str(args.dim), "--layers", str(args.layers),
                   "--seq", str(args.seq),
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--bucket-mb", str(args.bucket_mb)]
            tag = f"{os.getpid()}-{method}"
            if args.memory_budget_mb:
                fwd += ["--memory-budget-mb", str(args.memory_budget_mb), "--budget-tag", tag]
            try:
                code = relaunch(args.ranks, fwd)
            finally:
                if args.memory_budget_mb:
                    from mpitrain.bench.budget import remove_budgets

                    remove_budgets(tag, args.ranks)
            if code != 0 and args.memory_budget_mb and not out.exists():
                killed.append({"method": method, "exit": code})
                print(f"{method}: killed over the {args.memory_budget_mb:g} MiB per-rank "
                      f"budget (mpiexec exit {code})", flush=True)
                continue
            if code != 0:
                return code
            rows.append(json.loads(out.read_text()))
    if rows:
        report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"benchmark": "shard", "machine": machine_info(), "rows": rows,
             "budget_mb": args.memory_budget_mb, "killed": killed}, indent=1))
    return 0


def machine_info() -> dict[str, Any]:
    """The machine record (without starting MPI in the driver)."""
    import os
    import platform

    return {"host": platform.node(), "cores": os.cpu_count(),
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
