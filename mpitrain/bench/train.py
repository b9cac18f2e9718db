"""Training-step benchmark: one process vs mpitrain vs torch DDP (gloo), same model and batch.

``python -m mpitrain.bench train [-n 2] [--json PATH]`` starts ONE ``mpiexec -n N`` job per
model (MLP 784-1024-1024-10, ~1.9M params; CNN, ~1.2M params) in which every method has its
own copy of the model and they take turns, round-robin, ``--rounds`` times:

- ``single``: rank 0 alone (no communication; the other ranks sleep), the 1-process baseline;
- ``mpitrain[:BUCKET_MB][:on|off][:hier][:nopipe][:thread][:HOOK]``: ``DataParallel``
  (overlap on/off, ``hier``: the hierarchical all-reduce on the real node layout, ``nopipe``:
  without cutting buckets into pipelined pieces, ``thread``: the all-reduces on a
  communication thread, compression hook);
- ``ddp``: torch ``DistributedDataParallel`` over gloo (rank/size from mpi4py, rank 0 hosts);
- ``nocomm``: every rank trains its own copy at once with no gradient exchange: the ceiling
  that N ranks sharing this machine's cores and memory bandwidth can reach.

Taking turns in one job exposes every method to the same machine noise (the reference machine
is shared), so ratios stay meaningful. Batch 64 per rank, 1 torch thread per rank, SGD with
momentum, synthetic data. A method's step time is the slowest rank's mean over the timed
steps of one turn, and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpitrain.bench.allreduce import init_gloo, machine
from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.launch import launch_env, mpiexec_command

if TYPE_CHECKING:
    from mpi4py import MPI

MODELS = ("mlp", "cnn")
STEPS = {"mlp": (3, 30), "cnn": (1, 5)}  # (warmup, timed) per turn


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


def quiet_barrier(comm: MPI.Intracomm) -> None:
    """Collective: barrier that sleeps instead of spinning (idle ranks must not steal a core)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


def parse_method(spec: str) -> dict[str, Any]:
    """Parse ``single`` | ``ddp`` | ``mpitrain[:BUCKET_MB][:on|off][:hier][:HOOK]``."""
    name, *opts = spec.split(":")
    out: dict[str, Any] = {"spec": spec, "mode": name, "bucket_mb": None, "overlap": None,
                           "hook": "none", "hier": False, "pipe": True, "thread": False}
    for o in opts:
        if o in ("on", "off"):
            out["overlap"] = o == "on"
        elif o == "hier":
            out["hier"] = True
        elif o == "thread":  # the blocking all-reduces on a communication thread
            out["thread"] = True
        elif o == "nopipe":  # hierarchical without cutting buckets into pipelined pieces
            out["pipe"] = False
        elif o.replace(".", "", 1).isdigit():
            out["bucket_mb"] = float(o)
        elif o:
            out["hook"] = o
    if name not in ("single", "ddp", "mpitrain", "nocomm"):
        raise ValueError(f"unknown method {spec!r}")
    return out


def worker(args: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: time every method in turns; rank 0 writes the JSON result."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    torch.set_num_threads(1)
    methods = [parse_method(s) for s in args.methods.split(",")]
    device = torch.device("cpu")
    if args.device == "cuda":  # one rank per GPU, by node-local rank
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        device = torch.device(f"cuda:{local.rank % torch.cuda.device_count()}")
        local.Free()
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(args.batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def fence() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if any(m["mode"] == "ddp" for m in methods):
        init_gloo(comm)
    steps: list[Callable[[], float]] = []
    for m in methods:
        model = build_model(args.model).to(device)
        wrapped: Any = model
        sync: Callable[[], None] | None = None
        if m["mode"] == "mpitrain":
            from mpitrain.grad import DataParallel

            reducer: Any = None
            if m["hier"]:
                from mpitrain.comm.hierarchical import HierarchicalReducer
                from mpitrain.runtime.world import World

                ov = True if m["overlap"] is None else bool(m["overlap"])
                from mpitrain.comm.hierarchical import PIPELINE_BYTES

                reducer = HierarchicalReducer.create(
                    World.create(comm), overlap=ov,
                    pipeline_bytes=PIPELINE_BYTES if m["pipe"] else 1 << 40)
            if m["thread"]:
                from mpitrain.comm.reducer import FlatReducer
                from mpitrain.comm.threaded import ThreadReducer

                ov = True if m["overlap"] is None else bool(m["overlap"])
                reducer = ThreadReducer(reducer or FlatReducer(comm.Dup(), overlap=ov),
                                        comm.rank)
            dp = DataParallel(model, comm=comm, bucket_mb=m["bucket_mb"], hook=m["hook"],
                              overlap=m["overlap"], reducer=reducer)
            wrapped, sync = dp, dp.synchronize
            m["buckets"] = dp.engine.describe()
            m["overlap"] = dp.engine.overlap
        elif m["mode"] == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(wrapped: Any = wrapped, opt: Any = opt, sync: Any = sync) -> float:
            opt.zero_grad()
            F.cross_entropy(wrapped(x), y).backward()  # type: ignore[no-untyped-call]
            waited = 0.0
            if sync is not None:
                t = time.perf_counter()
                sync()
                waited = time.perf_counter() - t
            opt.step()
            return waited

        steps.append(step)
    times: list[list[float]] = [[] for _ in methods]
    waits: list[list[float]] = [[] for _ in methods]
    for _ in range(args.rounds):
        for i, m in enumerate(methods):
            quiet_barrier(comm)
            active = m["mode"] != "single" or comm.rank == 0
            elapsed = waited = 0.0
            if active:
                for _ in range(args.warmup):
                    steps[i]()
                if m["mode"] != "single":
                    comm.Barrier()
                fence()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    waited += steps[i]()
                fence()
                elapsed = time.perf_counter() - t0
            times[i].append(comm.allreduce(elapsed, op=MPI.MAX) / args.steps)
            waits[i].append(comm.allreduce(waited, op=MPI.MAX) / args.steps)
    if args.model and any(m["mode"] == "ddp" for m in methods):
        import torch.distributed as dist

        dist.destroy_process_group()
    if comm.rank == 0:
        n_params = sum(p.numel() for p in build_model(args.model).parameters())
        rows = []
        for i, m in enumerate(methods):
            ranks = 1 if m["mode"] == "single" else comm.size
            t = statistics.median(times[i])
            rows.append({
                **m, "model": args.model, "ranks": ranks, "params": n_params,
                "step_ms": t * 1e3, "step_ms_rounds": [round(v * 1e3, 2) for v in times[i]],
                "samples_per_s": ranks * args.batch / t,
                "sync_wait_ms": statistics.median(waits[i]) * 1e3,
            })
        Path(args.out).write_text(json.dumps(rows))
    return 0


def main(argv: list[str]) -> int:
    """Entry point: one job per model, then the comparison table."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--methods", default="single,nocomm,mpitrain,ddp",
                   help="comma list: single, nocomm, ddp, mpitrain[:BUCKET_MB][:on|off][:HOOK]")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--rounds", type=int, default=7, help="turns per method (median)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply timed steps per turn")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one rank per GPU (mpitrain stages gradients through host "
                        "buffers unless given a CUDA-aware reducer)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_mpi(lambda comm: worker(args, comm))
    n = args.ranks
    print(f"train step, {n} ranks, batch {args.batch}/rank, 1 thread/rank, methods taking "
          f"turns in one job per model, median of {args.rounds} rounds", flush=True)
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        warmup, steps = STEPS[model]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [
                *mpiexec_command(n), sys.executable, "-m", "mpitrain.bench", "train", "--worker",
                "--model", model, "--methods", args.methods, "--batch", str(args.batch),
                "--rounds", str(args.rounds), "--warmup", str(warmup), "--device", args.device,
                "--steps", str(max(1, int(steps * args.scale))), "--out", str(out),
            ]
            proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True,
                                  timeout=1800)
            if proc.returncode != 0 or not out.exists():
                print(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}", file=sys.stderr)
                return 1
            got = json.loads(out.read_text())
        single = next((r for r in got if r["mode"] == "single"), None)
        ddp = next((r for r in got if r["mode"] == "ddp"), None)
        ceiling = next((r for r in got if r["mode"] == "nocomm"), None)
        for r in got:
            r["vs_nocomm"] = r["samples_per_s"] / ceiling["samples_per_s"] if ceiling else None
            r["efficiency"] = (r["samples_per_s"] / (r["ranks"] * single["samples_per_s"])
                               if single else None)
            r["vs_ddp"] = r["samples_per_s"] / ddp["samples_per_s"] if ddp else None
        rows += got
    print(f"{'model':<5} {'method':<20} {'ranks':>5} {'step ms':>8} {'samples/s':>10} "
          f"{'sync ms':>8} {'eff %':>6} {'vs ddp':>7} {'of nocomm':>9}")
    for r in rows:
        eff = f"{100 * r['efficiency']:.1f}" if r["efficiency"] else "-"
        vs = f"{r['vs_ddp']:.2f}x" if r["vs_ddp"] else "-"
        ceil = f"{100 * r['vs_nocomm']:.1f}%" if r.get("vs_nocomm") else "-"
        print(f"{r['model']:<5} {r['spec']:<20} {r['ranks']:>5} {r['step_ms']:>8.2f} "
              f"{r['samples_per_s']:>10.0f} {r['sync_wait_ms']:>8.2f} {eff:>6} {vs:>7} "
              f"{ceil:>9}")
    print("eff: samples/s / (ranks x single); vs ddp: samples/s / torch DDP (gloo)'s; "
          "of nocomm: samples/s / N ranks computing with no exchange; sync: in synchronize()")
    if args.json:
        result = {"benchmark": "train", "ranks": n, "batch": args.batch, "machine": machine(),
                  "argv": argv, "rounds": args.rounds, "rows": rows,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
