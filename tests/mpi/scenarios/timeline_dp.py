"""Record timelines of DataParallel training on every rank and write them merged on rank 0.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/timeline_dp.py OUTDIR
Writes OUTDIR/dp.json (8 steps; rank r's clock is skewed by r x 7 s and r x 20000 ppm, so only
the offset and drift correction can line the ranks up; the last rank sleeps 15 ms before
synchronize, a known straggler; ten barrier-marked events), OUTDIR/window.json (300 steps,
window 100:105) and OUTDIR/ring.json (300 steps, no window, ring buffer of 400 events).
Prints "BUCKETS n", "ORIGIN ns" (rank 0's clock when the skew starts) and "PASS <check>" lines
on rank 0; tests/mpi/test_timeline.py reads the files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.runtime.abort import run_mpi
from mpitrain.timeline import Recorder, start

SKEW_NS = 7_000_000_000
DRIFT_PPM = 20_000
STRAGGLE_S = 0.015


def train(comm: MPI.Intracomm, rec: object, model: DataParallel, steps: int,
          straggle: bool) -> None:
    assert isinstance(rec, Recorder)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(comm.rank)
    for step in range(steps):
        rec.step_begin(step)
        t = rec.now()
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        rec.span("data wait", t, cat="data")
        t = rec.now()
        loss = nn.functional.cross_entropy(model(x), y)
        rec.span("forward", t)
        t = rec.now()
        loss.backward()
        rec.span("backward", t)
        if straggle and comm.rank == comm.size - 1:
            time.sleep(STRAGGLE_S)
        t = rec.now()
        model.synchronize()
        rec.span("synchronize", t, cat="sync")
        t = rec.now()
        opt.step()
        opt.zero_grad()
        rec.span("optimizer", t)
        rec.step_end()


def net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def main(comm: MPI.Intracomm) -> int:
    out = Path(sys.argv[1])
    rank = comm.rank
    origin = comm.bcast(time.perf_counter_ns(), root=0)

    def skewed() -> int:
        t = time.perf_counter_ns()
        return t + rank * SKEW_NS + rank * (t - origin) * DRIFT_PPM // 1_000_000

    session = start(comm, out / "dp.json", steps=None, clock=skewed)
    model = DataParallel(net(256), comm=comm, bucket_mb=0.1)
    model.engine.timeline = session.recorder
    train(comm, session.recorder, model, 8, straggle=True)
    time.sleep(0.3)
    for k in range(10):
        comm.Barrier()
        session.recorder.mark("barrier", {"i": k})
    time.sleep(0.3)
    session.stop()
    if rank == 0:
        print(f"BUCKETS {len(model.engine.buckets)}", flush=True)
        print(f"ORIGIN {origin}", flush=True)
        print("PASS dp trace written", flush=True)
    small = DataParallel(net(16), comm=comm, bucket_mb=0.001)
    for name, steps, capacity in (("window", (100, 105), 20_000), ("ring", None, 400)):
        session = start(comm, out / f"{name}.json", steps=steps, capacity=capacity)
        small.engine.timeline = session.recorder
        train(comm, session.recorder, small, 300, straggle=False)
        session.stop()
        if rank == 0:
            print(f"PASS {name} trace written", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(run_mpi(main))
