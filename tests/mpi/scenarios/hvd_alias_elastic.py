"""A Horovod script that imports ``horovod`` itself: alias, elastic, ranks that end unevenly.

Needs the alias on the path (``python -m mpitrain.horovod install-alias --target DIR``, then
``PYTHONPATH=DIR``). Run by hand with 3 ranks:
mpiexec -n 3 python tests/mpi/scenarios/hvd_alias_elastic.py
Rank 0 prints one "PASS <group>" line per group; a failed check raises (and aborts the job).
The last group ends rank 1 early on purpose: it returns without ``hvd.shutdown()``.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import horovod
import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
from horovod.torch.compression import Compression, FP16Compressor
from horovod.torch.elastic import ElasticSampler, TorchState
from horovod.torch.functions import allgather_object, broadcast_object
from horovod.torch.mpi_ops import Sum, allreduce_async, synchronize
from mpi4py import MPI
from torch import nn

from mpitrain.runtime.abort import run_mpi


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {hvd.rank()}: {what}")


def same_everywhere(model: nn.Module, what: str) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    check(all(torch.equal(f, flat) for f in hvd.allgather_object(flat)), what)


def alias_checks() -> None:
    import mpitrain.horovod

    check(hvd is mpitrain.horovod, "horovod.torch is not mpitrain.horovod")
    check(horovod.__version__ == "0.28.1+mpitrain", horovod.__version__)
    check(importlib.metadata.version("horovod") == "0.28.1+mpitrain", "dist-info version")
    check(HorovodInternalError is hvd.HorovodInternalError, "one HorovodInternalError class")
    check(Compression.fp16 is FP16Compressor, "compression module")
    got = synchronize(allreduce_async(torch.full((2,), float(hvd.rank())), op=Sum))
    check(got.tolist() == [float(sum(range(hvd.size())))] * 2, f"mpi_ops allreduce {got}")
    check(broadcast_object({"r": hvd.rank()}, root_rank=1) == {"r": 1}, "functions broadcast")
    check(allgather_object(hvd.rank()) == list(range(hvd.size())), "functions allgather")


def make_state() -> tuple[nn.Module, TorchState, ElasticSampler]:
    torch.manual_seed(100 + hvd.rank())  # different on every rank: sync must fix it
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    data = torch.arange(96.0).reshape(24, 4) / 96.0
    sampler = ElasticSampler(list(range(len(data))), shuffle=True, seed=3)
    # a stale value on the other ranks: sync must give rank 0's everywhere
    state = TorchState(model, opt, sampler=sampler, epoch=0 if hvd.rank() == 0 else 7, batch=0)
    return model, state, sampler


def elastic_checks() -> None:
    model, state, sampler = make_state()
    data = torch.arange(96.0).reshape(24, 4) / 96.0
    target = data.sum(1, keepdim=True)
    calls: list[int] = []
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])
    even = hvd.add_process_set([0, 2] if hvd.size() > 2 else [0])

    @hvd.elastic.run
    def train(state: TorchState) -> list[float]:
        calls.append(state.epoch)
        check(state.epoch == 0 and state.batch == 0, f"synced values {state.epoch}")
        same_everywhere(state.model, "model synced from rank 0 before train()")
        if len(calls) == 1:  # the script asks for a reset itself: Horovod's reset and retry
            raise HostsUpdatedInterrupt(False)
        losses = []
        for epoch in range(state.epoch, 3):
            state.epoch = epoch
            for idx in torch.utils.data.BatchSampler(list(sampler), 2, drop_last=False):
                state.optimizer.zero_grad()
                loss = ((state.model(data[idx]) - target[idx]) ** 2).mean()
                loss.backward()
                state.optimizer.step()
                sampler.record_batch(0, 2)
                state.batch += 1
                losses.append(float(hvd.allreduce(loss.detach())))
                state.commit()  # nothing changed: saves, and agrees on that
            sampler.set_epoch(state.epoch + 1)
            state.batch = 0
        return losses

    losses = train(state)
    check(len(calls) == 2 and resets == [hvd.size()], f"one reset and retry: {calls} {resets}")
    check(hvd.is_initialized() and even.included() is not None, "re-initialized, set kept")
    if even.included():
        got = hvd.allreduce(torch.ones(1), process_set=even, op=hvd.Sum).item()
        check(got == even.size(), f"process set works after the reset: {got}")
    check(losses[-1] < losses[0] / 2, f"trains: {losses[0]:.4f} -> {losses[-1]:.4f}")
    same_everywhere(model, "replicas equal after training")

    # restore() puts back the last commit: parameters, optimizer state, sampler, values
    state.commit()
    committed = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state.batch, sampler.processed_num = 5, 6
    state.restore()
    check(all(torch.equal(p, c) for p, c in zip(model.parameters(), committed, strict=True)),
          "restore() gives the committed parameters")
    check(state.batch == 0 and sampler.processed_num == 0, "restore() gives committed values")

    # a collective that fails on every rank: the state goes back to the last commit, raised
    @hvd.elastic.run
    def mismatched(state: TorchState) -> None:
        state.commit()
        with torch.no_grad():
            for p in state.model.parameters():
                p.mul_(0.0)
        hvd.allreduce(torch.ones(hvd.rank() + 1), name="uneven")  # shapes differ per rank

    try:
        mismatched(state)
    except HorovodInternalError as exc:
        check("Mismatched allreduce tensor shapes" in str(exc), str(exc))
        check(any("restored to the last commit" in n for n in exc.__notes__), "note")
    else:
        raise AssertionError("a mismatched allreduce did not raise")
    check(all(torch.equal(p, c) for p, c in zip(model.parameters(), committed, strict=True)),
          "a failed collective restores the committed parameters")

    # hosts really added (only rank 0 is told, as Horovod's driver may): every rank raises
    @hvd.elastic.run
    def told(state: TorchState) -> None:
        if hvd.rank() == 0:
            state.on_hosts_updated(int(time.time()), hvd.elastic.HostUpdateResult.added)
        state.commit()

    try:
        told(state)
    except hvd.elastic.HostsChangedError as exc:
        check("hosts were added" in str(exc), str(exc))
        check(isinstance(exc.__cause__, HostsUpdatedInterrupt), "caused by the interrupt")
    else:
        raise AssertionError("a host change did not raise")
    hvd.barrier()


def shutdown_checks(comm: MPI.Intracomm) -> None:
    """Rank 1 shuts down while rank 0 is in a collective on {0, 1} and rank 2 waits for rank 0
    on {0, 2}: both raise (rank 2 before rank 0 shuts down: rank 0 passes the notice on), and
    so does every later call."""
    hvd.shutdown()
    one = hvd.ProcessSet([0, 1])
    two = hvd.ProcessSet([0, 2])
    hvd.init(process_sets=[one, two])
    r = hvd.rank()
    x = torch.ones(3)
    hvd.barrier()
    if r == 1:
        time.sleep(2.0)
        hvd.shutdown()
        hvd.init()  # the last group needs every rank again
        return
    t0 = time.perf_counter()
    try:
        hvd.allreduce(x, name="pending", process_set=one if r == 0 else two)
    except HorovodInternalError as exc:
        waited = time.perf_counter() - t0
        check("Horovod has been shut down: rank 1 " in str(exc), str(exc))
        check(1.0 < waited < 20.0, f"raised after {waited:.2f} s")
    else:
        raise AssertionError("a collective with a shut-down rank returned")
    if r == 2:
        comm.send("raised", dest=0, tag=7)  # plain MPI, outside Horovod
    for what, fn in (("allreduce", lambda: hvd.allreduce(x)),
                     ("allreduce_async", lambda: hvd.allreduce_async(x, process_set=two)),
                     ("barrier", hvd.barrier), ("broadcast_object", lambda: broadcast_object(1)),
                     ("join", hvd.join)):
        t1 = time.perf_counter()
        try:
            fn()
        except HorovodInternalError as exc:
            check("Horovod has been shut down: rank 1 " in str(exc), f"later {what}: {exc}")
            check(time.perf_counter() - t1 < 1.0, f"later {what} raised at once")
        else:
            raise AssertionError(f"later {what} after a shutdown returned")
    if r == 0:  # rank 2 was told while rank 0 still runs (not only at rank 0's shutdown)
        check(comm.recv(source=2, tag=7) == "raised", "rank 2 raised")
    hvd.shutdown()
    hvd.init()


def exit_checks() -> None:
    """Rank 1 ends its script without hvd.shutdown(); the others are in (or start) a call."""
    r = hvd.rank()
    hvd.barrier()
    if r == 1:
        time.sleep(2.0)
        return  # interpreter exit after init(): atexit shuts Horovod down
    try:
        if r == 0:
            hvd.allreduce(torch.ones(2))
        else:  # the async call returns a handle; synchronize raises
            h = hvd.allreduce_async(torch.ones(2), name="pending")
            synchronize(h)
    except HorovodInternalError as exc:
        check("Horovod has been shut down: rank 1 " in str(exc), str(exc))
    else:
        raise AssertionError("a collective with an exited rank returned")


def main(comm: MPI.Intracomm) -> int:
    """Every group in order (3 ranks for the shut-down groups)."""
    hvd.init()
    torch.set_num_threads(1)
    groups = [("horovod alias", alias_checks), ("elastic", elastic_checks)]
    if hvd.size() >= 3:
        groups += [("shutdown while peers are in a collective", lambda: shutdown_checks(comm)),
                   ("exit while peers are in a collective", exit_checks)]
    for label, fn in groups:
        t0 = time.perf_counter()
        fn()
        if hvd.rank() == 0:
            print(f"PASS {label} ({time.perf_counter() - t0:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
