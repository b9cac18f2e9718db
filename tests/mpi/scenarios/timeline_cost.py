"""Measure what recording a timeline costs per training step (docs/profiling.md).

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/timeline_cost.py [ROUNDS] [STEPS] [TRACE]
    [OVERLAP: on|off]
DataParallel MLP 784-1024-1024-10 (1.86M parameters, 4 MiB buckets), batch 64 per rank, the
loop instrumented as the trainer is (step, data wait, forward, backward, synchronize,
optimizer). Rounds alternate recording off (the null recorder) and on (every step recorded);
rank 0 prints the median step time of each and the difference, plus the events per step.
With TRACE, the recorded steps are written there (the last 200 steps: a ring buffer of 3000).
OVERLAP off reduces every bucket at synchronize() instead of during backward (what
overlap buys, docs/profiling.md).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.runtime.abort import run_mpi
from mpitrain.timeline import NULL, Recorder, Timeline, start


def steps(comm: MPI.Intracomm, model: DataParallel, opt: torch.optim.Optimizer,
          tl: Timeline, n: int, first: int) -> list[float]:
    model.engine.timeline = tl
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    out = []
    for step in range(first, first + n):
        t_step = time.perf_counter()
        tl.step_begin(step)
        t = tl.now()
        xb, yb = x.clone(), y.clone()
        tl.span("data wait", t, cat="data")
        t = tl.now()
        loss = nn.functional.cross_entropy(model(xb), yb)
        tl.span("forward", t)
        t = tl.now()
        loss.backward()
        tl.span("backward", t)
        t = tl.now()
        model.synchronize()
        tl.span("synchronize", t, cat="sync")
        t = tl.now()
        opt.step()
        opt.zero_grad()
        tl.span("optimizer", t)
        tl.step_end()
        out.append(time.perf_counter() - t_step)
    comm.Barrier()
    return out


def main(comm: MPI.Intracomm) -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 10))
    overlap = (sys.argv[4] != "off") if len(sys.argv) > 4 else None
    model = DataParallel(net, comm=comm, bucket_mb=4, overlap=overlap)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    session = start(comm, sys.argv[3] if len(sys.argv) > 3 else None, capacity=3000)
    rec = session.recorder if session.active else Recorder(capacity=1_000_000)
    steps(comm, model, opt, NULL, 10, 0)  # warm-up
    times: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            tl: Timeline = NULL if name == "off" else rec
            times[name].append(statistics.median(steps(comm, model, opt, tl, n, r * n)))
    assert isinstance(rec, Recorder)
    per_step = rec.recorded / (rounds * n)
    session.stop()
    t0 = time.perf_counter_ns()
    probe = Recorder(steps=None, capacity=100_000)
    for _ in range(100_000):
        probe.span("forward", probe.now())
    span_ns = (time.perf_counter_ns() - t0) / 100_000
    gathered = comm.gather(times, root=0)
    if comm.rank == 0:
        assert gathered is not None
        off = statistics.median(v for g in gathered for v in g["off"]) * 1e3
        on = statistics.median(v for g in gathered for v in g["on"]) * 1e3
        print(f"COST off {off:.3f} ms on {on:.3f} ms diff {on - off:+.3f} ms "
              f"({100 * (on - off) / off:+.2f}%); {per_step:.1f} events/step, "
              f"{span_ns:.0f} ns per span -> {per_step * span_ns / 1e6:.4f} ms/step "
              f"({100 * per_step * span_ns / 1e6 / off:.3f}% of step)", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(run_mpi(main))
