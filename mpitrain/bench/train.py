"""Training-step benchmark: one process vs mpitrain vs torch DDP (gloo), same model and batch.

``python -m mpitrain.bench train [-n 2] [--json PATH]`` runs, for each model (MLP
784-1024-1024-10, ~1.9M params; CNN, ~1.2M params), ``single`` (one process, no
communication), ``mpitrain`` (DataParallel) and ``ddp`` (torch DDP over gloo, ranks started by
mpiexec, rank/size from mpi4py) as separate mpiexec jobs from this one invocation; batch 64 per
rank, 1 torch thread per rank, SGD with momentum, synthetic data. Step time is the slowest
rank's mean over the timed steps (median over ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mpitrain.bench.allreduce import init_gloo, machine
from mpitrain.runtime.launch import launch_env, mpiexec_command

MODELS = ("mlp", "cnn")
STEPS = {"mlp": (10, 100), "cnn": (3, 20)}  # (warmup, timed)


def build_model(name: str) -> Any:
    """Return the benchmark model ``name`` (seeded: identical on every rank)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 10),
        )
    if name == "cnn":  # PyTorch's MNIST example net, 1.2M parameters
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    raise ValueError(f"unknown model {name!r}")


def worker(args: argparse.Namespace) -> int:
    """Collective: time ``args.steps`` training steps in ``args.mode``; rank 0 writes JSON."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD.Dup()
    model = build_model(args.model)
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    sync: Any = None
    wrapped: Any = model
    info: dict[str, Any] = {}
    if args.mode == "mpitrain":
        from mpitrain.grad import DataParallel

        overlap = None if args.overlap == "auto" else args.overlap == "on"
        dp = DataParallel(
            model, comm=comm, bucket_mb=args.bucket_mb, hook=args.compression, overlap=overlap
        )
        wrapped, sync = dp, dp.synchronize
        info = {"buckets": dp.engine.describe(), "overlap": dp.engine.overlap}
    elif args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        init_gloo(comm)
        wrapped = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    comm_time = 0.0

    def step() -> None:
        nonlocal comm_time
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()  # type: ignore[no-untyped-call]
        if sync is not None:
            t = time.perf_counter()
            sync()
            comm_time += time.perf_counter() - t
        opt.step()

    for _ in range(args.warmup):
        step()
    comm_time = 0.0
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    waits = comm.gather(comm_time / args.steps, root=0)
    if args.mode == "ddp":
        import torch.distributed as dist

        dist.destroy_process_group()
    if comm.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        out = {
            "model": args.model, "mode": args.mode, "ranks": comm.size, "params": n_params,
            "step_ms": elapsed / args.steps * 1e3,
            "samples_per_s": comm.size * args.batch * args.steps / elapsed,
            "sync_wait_ms": max(waits or [0.0]) * 1e3, **info,
        }
        Path(args.out).write_text(json.dumps(out))
    return 0


def run_one(n: int, model: str, mode: str, args: argparse.Namespace, bucket_mb: float | None,
            ) -> dict[str, Any]:
    """Launch one worker job and return its result (median step time over repeats)."""
    warmup, steps = STEPS[model]
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [
                *mpiexec_command(n), sys.executable, "-m", "mpitrain.bench", "train", "--worker",
                "--model", model, "--mode", mode, "--batch", str(args.batch),
                "--warmup", str(warmup), "--steps", str(int(steps * args.scale)),
                "--compression", args.compression, "--overlap", args.overlap, "--out", str(out),
            ]
            if bucket_mb is not None:
                cmd += ["--bucket-mb", str(bucket_mb)]
            proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True,
                                  timeout=900)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
            results.append(json.loads(out.read_text()))
    results.sort(key=lambda r: r["step_ms"])
    best = dict(results[len(results) // 2])
    best["step_ms_all"] = [round(r["step_ms"], 2) for r in results]
    return best


def main(argv: list[str]) -> int:
    """Entry point: run every (model, mode) job and print the comparison table."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench train", description=__doc__)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--modes", default="single,mpitrain,ddp")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--bucket-mb", default=None, help="MiB, or a comma list to sweep")
    p.add_argument("--compression", default="none")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--repeat", type=int, default=3, help="runs per point (median)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply timed steps")
    p.add_argument("--json", help="write results as JSON here")
    # worker-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.bucket_mb = float(args.bucket_mb) if args.bucket_mb else None
        return worker(args)
    buckets = [float(b) for b in args.bucket_mb.split(",")] if args.bucket_mb else [None]
    n = args.ranks
    print(f"train step, {n} ranks, batch {args.batch}/rank, 1 thread/rank, "
          f"compression {args.compression}, overlap {args.overlap}")
    rows = []
    for model in args.models.split(","):
        got: list[dict[str, Any]] = []
        for mode in args.modes.split(","):
            for b in buckets if mode == "mpitrain" else [None]:
                r = run_one(1 if mode == "single" else n, model, mode, args, b)
                r["bucket_mb"] = b
                got.append(r)
                print(f"  ran {model} {mode} bucket_mb={b}: {r['step_ms']:.2f} ms/step",
                      flush=True)
        single = next((r for r in got if r["mode"] == "single"), None)
        ddp = next((r for r in got if r["mode"] == "ddp"), None)
        for r in got:
            r["efficiency"] = (
                r["samples_per_s"] / (r["ranks"] * single["samples_per_s"]) if single else None
            )
            r["vs_ddp"] = r["samples_per_s"] / ddp["samples_per_s"] if ddp else None
        rows += got
    print(f"{'model':<5} {'mode':<9} {'bucketMB':>8} {'ranks':>5} {'step ms':>8} "
          f"{'samples/s':>10} {'sync ms':>8} {'eff %':>6} {'vs ddp':>7}")
    for r in rows:
        eff = f"{100 * r['efficiency']:.1f}" if r["efficiency"] else "-"
        vs = f"{r['vs_ddp']:.2f}x" if r["vs_ddp"] else "-"
        b = r["bucket_mb"]
        print(f"{r['model']:<5} {r['mode']:<9} {b if b is not None else '-':>8} {r['ranks']:>5} "
              f"{r['step_ms']:>8.2f} {r['samples_per_s']:>10.0f} "
              f"{r.get('sync_wait_ms', 0):>8.2f} {eff:>6} {vs:>7}", flush=True)
    if args.json:
        result = {"benchmark": "train", "ranks": n, "batch": args.batch, "machine": machine(),
                  "argv": argv, "rows": rows,
                  "median_of": args.repeat, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                 time.gmtime())}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("eff: samples/s / (ranks x single); vs ddp: samples/s / torch DDP (gloo)'s; "
          "sync: time in synchronize()")
    return 0
