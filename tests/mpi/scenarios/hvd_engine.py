"""The Horovod engine: ``*_async`` queued and returning at once, submission order, the
response cache (hits bitwise equal, a signature differing after it was cached is still an
error on every rank), and the invalidations.

Run by ``hvd_sets.py --all`` (same launch, torch loads once), or by hand:
mpiexec -n 2 python tests/mpi/scenarios/hvd_engine.py   (also -n 4)
Rank 0 prints one "PASS <group>" line per group; a failed check raises.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from torch import nn

import mpitrain.horovod as hvd
from mpitrain.horovod import context as _c
from mpitrain.runtime.abort import run_mpi


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {hvd.rank()}: {what}")


def raises(exc: type[BaseException], fn: Any, what: str, needle: str = "") -> str:
    t0 = time.monotonic()
    try:
        fn()
    except exc as e:
        check(needle in str(e), f"{what}: {needle!r} not in {e}")
        check(time.monotonic() - t0 < 5, f"{what}: took too long")
        return str(e)
    raise AssertionError(f"rank {hvd.rank()}: {what}: no {exc.__name__}")


def cache() -> Any:
    return _c.context().state_of(hvd.global_process_set).cache


def async_checks(n: int, r: int) -> None:
    """Rank 0's ``allreduce_async`` returns before any peer has called it (it is only
    queued), its duplicate name raises ValueError at once on rank 0 alone, then the peers
    call it: nothing hangs (before the engine, rank 0 waited in the agreement)."""
    from mpi4py import MPI

    side = MPI.COMM_WORLD.Dup()  # tells the peers that rank 0 has returned
    t = torch.full((3,), float(r + 1))
    if r == 0:
        h = hvd.allreduce_async(t, name="early")
        check(not hvd.poll(h), "complete before its peers called it")
        raises(ValueError, lambda: hvd.allreduce_async(t, name="early"), "in flight",
               "same name")
        for k in range(1, n):
            side.send("returned", dest=k)
    else:
        req = side.irecv(source=0)
        deadline = time.monotonic() + 10
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.001)
        returned = req.Test()
        h = hvd.allreduce_async(t, name="early")  # lets rank 0 go on in any case
        check(returned, "rank 0's allreduce_async did not return before its peers called it")
        req.wait()
    hvd.barrier()
    check(torch.equal(hvd.synchronize(h), torch.full((3,), (n + 1) / 2)), "early result")
    side.Free()
    # FIFO: once the last of three queued operations is done, the first two are too
    hs = [hvd.allreduce_async(torch.full((2,), float(k)), name=f"fifo{k}") for k in range(3)]
    last = hvd.synchronize(hs[2])
    check(torch.equal(last, torch.full((2,), 2.0)), "fifo result")
    check(hvd.poll(hs[0]) and hvd.poll(hs[1]), "queued operations run in submission order")
    for k in range(2):
        hvd.synchronize(hs[k])
    # a different order on some ranks: both operations fail on every rank, same message
    names = ["x", "y"] if r % 2 == 0 else ["y", "x"]
    hs = [hvd.allreduce_async(torch.ones(2), name=nm) for nm in names]
    msgs = [raises(hvd.HorovodInternalError, lambda h=h: hvd.synchronize(h), "order",
                   "Mismatched tensor names") for h in hs]
    check(all(m == msgs for m in hvd.allgather_object(msgs)), f"order: messages {msgs}")
    # a mismatch in the middle of queued operations fails that one alone
    a = hvd.allreduce_async(torch.ones(2), name="a")
    b = hvd.allreduce_async(torch.ones(2 + (r == n - 1)), name="b")
    c = hvd.allreduce_async(torch.ones(2), op=hvd.Sum, name="c")
    check(torch.equal(hvd.synchronize(a), torch.ones(2)), "before the mismatch")
    raises(hvd.HorovodInternalError, lambda: hvd.synchronize(b), "middle", "shapes")
    check(torch.equal(hvd.synchronize(c), torch.full((2,), float(n))), "after the mismatch")


def train(mode: str, capacity: int, r: int) -> list[torch.Tensor]:
    """Three steps of Horovod client code (DistributedOptimizer, an in-place and an async
    all-reduce, a broadcast) under the given engine settings; returns the parameters."""
    hvd.configure(progress=mode, cache_capacity=capacity)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters())
    g = torch.Generator().manual_seed(r)
    for _ in range(3):
        x = torch.randn(4, 5, generator=g) / 3
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        m = hvd.allreduce_(model[0].bias.detach().clone(), name="metric")
        h = hvd.allreduce_async(model[2].weight.detach(), op=hvd.Sum, name="w")
        model[2].bias.data += hvd.synchronize(h).sum() * 1e-3 + m.sum() * 1e-3
    return [p.detach().clone() for p in model.parameters()]


def cache_checks(n: int, r: int) -> None:
    """Cache hits give bitwise the results of no cache and of agreeing at the call; a
    signature differing on one rank after it was cached is an error on every rank (same
    message), and the caches stay the same on every rank."""
    runs = {}
    for mode, capacity in (("auto", 1024), ("thread", 1024), ("thread", 0), ("poll", 1024),
                           ("poll", 0)):
        runs[(mode, capacity)] = train(mode, capacity, r)
        if capacity:
            check(cache().hits >= 6, f"{mode}: cache hits {cache().hits}")
        else:
            check(cache().hits == 0 and len(cache()) == 0, f"{mode}: capacity 0 caches")
    ref = runs[("auto", 1024)]
    for key, params in runs.items():
        check(all(torch.equal(p, q) for p, q in zip(params, ref, strict=True)),
              f"{key} differs from the default path: {params} != {ref}")
    check(all(torch.equal(p, q) for p, q in zip(
        ref, hvd.broadcast_object(ref, root_rank=0), strict=True)), "replicas differ")
    hvd.configure(progress="thread", cache_capacity=1024)
    # cached, then one rank's shape differs: every rank raises the same error
    odd = r == n - 1
    for blocking in (True, False):
        for _ in range(2):
            hvd.allreduce(torch.ones(4), name="c")
        hits = cache().hits
        hvd.allreduce(torch.ones(4), name="c")
        check(cache().hits == hits + 1, "the repeated call is a hit")
        sigs = hvd.allgather_object(cache().signatures())
        check(all(s == sigs[0] for s in sigs) and len(sigs[0]) > 0, "caches differ")

        def call(blocking: bool = blocking) -> Any:
            t = torch.ones(5 if odd else 4)
            if blocking:
                return hvd.allreduce(t, name="c")
            return hvd.synchronize(hvd.allreduce_async(t, name="c"))
        msg = raises(hvd.HorovodInternalError, call, "cached mismatch", "shapes")
        check(all(m == msg for m in hvd.allgather_object(msg)), "same message")
        sigs = hvd.allgather_object(cache().signatures())
        check(all(s == sigs[0] for s in sigs), "caches differ after the mismatch")
        check(not any(sig[1] == "c" for _, sig in sigs[0]), "the mismatched slot stays")
        check(torch.equal(hvd.allreduce(torch.ones(4), name="c2", op=hvd.Sum),
                          torch.full((4,), float(n))), "after the mismatch")
    # invalidation: join empties the global set's cache on every rank
    hvd.allreduce(torch.ones(1), name="before join")
    hvd.join()
    check(len(cache()) == 0, "join empties the cache")
    hvd.configure(progress="auto", cache_capacity=1024)


GROUPS = (async_checks, cache_checks)


def run_groups(n: int, r: int) -> None:
    """Run every group; rank 0 prints a PASS line per group."""
    for group in GROUPS:
        hvd.barrier()
        t0 = time.perf_counter()
        group(n, r)
        if r == 0:
            print(f"PASS {group.__name__} ({time.perf_counter() - t0:.2f} s)", flush=True)


def main(comm: object) -> int:
    """Run every group (hvd.init() on COMM_WORLD)."""
    torch.set_num_threads(1)
    hvd.init()
    run_groups(hvd.size(), hvd.rank())
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
