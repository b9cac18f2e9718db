"""MLP training step through the Horovod API vs a hand-written flat Allreduce vs DataParallel.

Run by hand (not part of the test suite):
mpiexec -n 2 python tests/mpi/scenarios/hvd_step_bench.py [--rounds 7] [--steps 30]
    [--methods flat,dp,hvd,hvd:poll,hvd:poll:nocache] [--before DIR --methods ...,before]

Every method has its own copy of the MLP (784-1024-1024-10, batch 64 per rank, SGD with
momentum) and they take turns, round-robin, ``--rounds`` times in one job, so each sees the
same machine noise. A turn's step time is the slowest rank's mean over ``--steps`` steps;
rank 0 prints the median over rounds, each method's speed relative to the first method
(ratio of the medians) and the median of the per-round ratios (each round's methods ran
back to back, under about the same load):

- ``flat``: backward, then the gradients copied into one flat buffer, one blocking
  ``MPI_Allreduce``, divided and copied back (the hand-written loop);
- ``dp``: ``mpitrain.DataParallel`` (buckets launched during backward);
- ``hvd[:auto|:thread|:poll][:nocache]``: ``hvd.DistributedOptimizer`` (Horovod client
  code); ``auto``/``thread``/``poll``: the Horovod engine's progress mode, ``nocache``:
  response cache off (both through ``hvd.configure``, at the start of each turn; plain
  ``hvd``: the defaults).
- ``before``: the same client code on the Horovod layer of an older commit, as a package
  ``hvd_before`` in ``--before DIR``, made by
  ``git archive COMMIT mpitrain/horovod | tar -x -C DIR && mv DIR/mpitrain/horovod
  DIR/hvd_before && grep -rl mpitrain.horovod DIR/hvd_before | xargs sed -i
  's/mpitrain[.]horovod/hvd_before/g'`` (both layers initialised side by side).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
import torch.nn.functional as F
from torch import nn

import mpitrain.horovod as hvd
from mpitrain.runtime.abort import run_mpi


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 10))


def make_step(spec: str, comm: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Return one training step of method ``spec`` (its own model and optimizer)."""
    from mpi4py import MPI

    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    name, *opts = spec.split(":")
    if name == "before":
        import hvd_before  # type: ignore[import-not-found]

        old = hvd_before.DistributedOptimizer(base, named_parameters=model.named_parameters())

        def before_step() -> None:
            old.zero_grad()
            F.cross_entropy(model(x), y).backward()
            old.step()

        return before_step
    if name == "flat":
        params = list(model.parameters())
        flat = torch.zeros(sum(p.numel() for p in params))
        buf = flat.numpy()

        def step() -> None:
            base.zero_grad()
            F.cross_entropy(model(x), y).backward()
            off = 0
            for p in params:
                assert p.grad is not None
                flat[off:off + p.numel()].copy_(p.grad.view(-1))
                off += p.numel()
            comm.Allreduce(MPI.IN_PLACE, buf)
            flat.div_(comm.size)
            off = 0
            for p in params:
                assert p.grad is not None
                p.grad.view(-1).copy_(flat[off:off + p.numel()])
                off += p.numel()
            base.step()

        return step
    if name == "dp":
        from mpitrain.grad import DataParallel

        dp = DataParallel(model, comm=comm)

        def dp_step() -> None:
            base.zero_grad()
            F.cross_entropy(dp(x), y).backward()
            dp.synchronize()
            base.step()

        return dp_step
    if name != "hvd":
        raise ValueError(f"unknown method {spec!r}")
    settings: dict[str, Any] = {"progress": "auto", "cache_capacity": 1024}
    for o in opts:
        if o in ("auto", "thread", "poll"):
            settings["progress"] = o
        elif o == "nocache":
            settings["cache_capacity"] = 0
        else:
            raise ValueError(f"unknown option {o!r} in {spec!r}")
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())

    def hvd_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    hvd_step.settings = settings  # type: ignore[attr-defined]
    return hvd_step


def main(comm: Any) -> int:
    """Time every method in turns; rank 0 prints medians and ratios to ``flat``."""
    from mpi4py import MPI

    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="flat,dp,hvd")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--before", help="directory holding the package hvd_before")
    args = p.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    if args.before:
        sys.path.insert(0, args.before)
        import hvd_before

        hvd_before.init()
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    methods = args.methods.split(",")
    steps = [make_step(m, comm, x, y) for m in methods]
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            if hasattr(step, "settings") and hasattr(hvd, "configure"):
                hvd.configure(**step.settings)  # every rank, between the same collectives
            for _ in range(args.warmup):
                step()
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            dt = (time.perf_counter() - t0) / args.steps
            times[i].append(comm.allreduce(dt, op=MPI.MAX))
    if hasattr(hvd, "configure"):
        hvd.configure(progress="auto", cache_capacity=1024)
    if comm.rank == 0:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        ref = statistics.median(times[0])
        print(f"MLP step, {comm.size} ranks, batch 64/rank, median of {args.rounds} rounds x "
              f"{args.steps} steps, load average {' '.join(load)}")
        for m, ts in zip(methods, times, strict=True):
            med = statistics.median(ts)
            paired = statistics.median(a / b for a, b in zip(times[0], ts, strict=True))
            print(f"{m:<22} {med * 1e3:8.2f} ms  speed vs {methods[0]} {ref / med:5.3f}x  "
                  f"per-round {paired:5.3f}x  rounds "
                  f"{' '.join(f'{t * 1e3:.1f}' for t in ts)}", flush=True)
    if args.before:
        hvd_before.shutdown()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
