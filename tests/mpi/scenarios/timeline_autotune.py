"""Bucket autotuning picks the faster size, agrees across ranks and resumes with it.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/timeline_autotune.py
The hook sleeps 3 ms per bucket launched, so tiny buckets (0.01 MiB: one per weight, 12
buckets) are known to be slower than one 16 MiB bucket. Rank 0 prints "TABLE <line>" and
"PASS <check>" lines.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.comm.handle import Handle
from mpitrain.grad.autotune import BucketAutotuner
from mpitrain.grad.buckets import Bucket
from mpitrain.grad.hooks import HookState, allreduce_hook
from mpitrain.runtime.abort import run_mpi


def slow_hook(state: HookState, bucket: Bucket) -> Handle:
    time.sleep(0.003)
    return allreduce_hook(state, bucket)


def make_model(comm: MPI.Intracomm) -> DataParallel:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return DataParallel(nn.Sequential(*layers), comm=comm, bucket_mb=4, hook=slow_hook)


def step(model: DataParallel, opt: torch.optim.Optimizer, g: torch.Generator) -> float:
    t0 = time.perf_counter()
    x = torch.randn(8, 64, generator=g)
    model(x).square().mean().backward()
    model.synchronize()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


def main(comm: MPI.Intracomm) -> int:
    model = make_model(comm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(comm.rank)
    tuner = BucketAutotuner(comm, candidates=(0.01, 16.0), warmup=1, trial_steps=4)
    tuner.start(model)
    assert len(model.engine.buckets) == 12, model.engine.describe()
    result = None
    steps = 0
    while result is None:
        result = tuner.after_step(model, step(model, opt, g))
        steps += 1
    ok = result.chosen_mb == 16.0 and len(model.engine.buckets) == 1 and steps == 10
    for _ in range(3):  # training goes on with the chosen layout
        step(model, opt, g)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    digests = comm.allgather((result.state_dict(), float(flat.sum()), float(flat.square().sum())))
    agreed = all(d == digests[0] for d in digests)
    saved = json.loads(json.dumps(result.state_dict()))  # what the checkpoint keeps
    resumed = make_model(comm)
    tuner2 = BucketAutotuner(comm, candidates=(0.01, 16.0))
    tuner2.load_state_dict(saved)
    tuner2.start(resumed)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01)
    again = [tuner2.after_step(resumed, step(resumed, opt2, g)) for _ in range(3)]
    resumed_ok = tuner2.done and len(resumed.engine.buckets) == 1 and again == [None] * 3
    if comm.rank == 0:
        print(f"TABLE {result.table()}", flush=True)
        if ok:
            print("PASS picks the faster size", flush=True)
        if agreed:
            print("PASS same choice and parameters on every rank", flush=True)
        if resumed_ok:
            print("PASS resumes with the chosen size", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(run_mpi(main))
