"""Staged pipeline bookkeeping on CPU tensors: order, double buffering, buffer reuse."""

from __future__ import annotations

import pytest
import torch

from mpitrain.comm.cuda_aware import device_reducible, mpi_buffer
from mpitrain.comm.factory import choose_algo
from mpitrain.comm.handle import Handle
from mpitrain.comm.staged import BufferPool, HostCopies, StagedReducer
from mpitrain.errors import ConfigError


class PolledHandle:
    """Completes after ``polls`` calls to test(); wait() completes at once."""

    def __init__(self, log: list[str], name: str, t: torch.Tensor, polls: int) -> None:
        self.log, self.name, self.t, self.polls, self.done = log, name, t, polls, False

    def _complete(self) -> None:
        if not self.done:
            self.t.mul_(2)  # "two ranks with the same values"
            self.log.append(f"done {self.name}")
            self.done = True

    def wait(self) -> None:
        self._complete()

    def test(self) -> bool:
        self.polls -= 1
        if self.polls <= 0:
            self._complete()
        return self.done


class FakeReducer:
    """A host reducer over two pretend ranks holding equal values; logs its calls."""

    def __init__(self, log: list[str], polls: int = 1) -> None:
        self.log, self.polls, self.count = log, polls, 0

    @property
    def size(self) -> int:
        return 2

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        name = f"b{self.count}"
        self.count += 1
        self.log.append(f"reduce {name} n={t.numel()}")
        return PolledHandle(self.log, name, t, self.polls)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        self.iallreduce_(t, average=average).wait()


class LoggingCopies(HostCopies):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def to_host(self, src: torch.Tensor, dst: torch.Tensor, after: object) -> None:
        self.log.append(f"d2h n={src.numel()}")
        super().to_host(src, dst, after)

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.log.append(f"h2d n={src.numel()}")
        super().to_device(src, dst)


def make(polls: int = 1) -> tuple[StagedReducer, list[str]]:
    log: list[str] = []
    r = StagedReducer(FakeReducer(log, polls), pin=False, copies={"cpu": LoggingCopies(log)})
    return r, log


def test_copy_of_next_bucket_precedes_reduce_of_previous() -> None:
    r, log = make()
    ts = [torch.full((n,), float(n)) for n in (3, 5, 7)]
    hs = [r.iallreduce_(t, average=False) for t in ts]
    assert log == ["d2h n=3", "d2h n=5", "reduce b0 n=3", "d2h n=7", "reduce b1 n=5"]
    hs[2].wait()  # the last bucket starts at wait(), then copies back
    assert log[5:] == ["reduce b2 n=7", "done b2", "h2d n=7"]
    for h in hs:
        h.wait()
    assert log[8:] == ["done b0", "h2d n=3", "done b1", "h2d n=5"]
    assert [t.tolist() for t in ts] == [[6.0] * 3, [10.0] * 5, [14.0] * 7]


def test_test_drives_progress_without_blocking() -> None:
    r, log = make(polls=2)
    t = torch.arange(4.0).reshape(2, 2)
    h = r.iallreduce_(t, average=False)
    assert log == ["d2h n=4"]
    assert h.test() is False  # starts the reduction (copy done), first poll
    assert log == ["d2h n=4", "reduce b0 n=4"]
    assert h.test() is True and torch.equal(t, torch.arange(4.0).reshape(2, 2) * 2)
    assert log[-1] == "h2d n=4"
    h.wait()  # idempotent
    assert log.count("h2d n=4") == 1


def test_buffers_allocated_once_per_size_and_reused() -> None:
    r, _ = make()
    for _step in range(4):
        ts = [torch.ones(n) for n in (100, 200, 100)]
        hs = [r.iallreduce_(t, average=False) for t in ts]
        for h in hs:
            h.wait()
        assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in ts)
    assert r.pool.allocations == 3  # two of size 100 in flight at once, one of 200
    assert r.pool.total_bytes() == (100 + 200 + 100) * 4


def test_empty_and_single_rank_are_done_at_once() -> None:
    r, log = make()
    assert r.iallreduce_(torch.empty(0), average=True).test()
    assert log == []
    with pytest.raises(ValueError, match="contiguous"):
        r.iallreduce_(torch.ones(4, 4).t(), average=True)


def test_pool_is_not_pinned_without_cuda() -> None:
    pool = BufferPool()
    assert pool.pin is torch.cuda.is_available()
    buf = pool.acquire(8, torch.float32)
    pool.release(buf)
    assert pool.acquire(8, torch.float32) is buf and pool.allocations == 1


def test_mpi_buffer_is_zero_copy_on_host() -> None:
    t = torch.zeros(6)
    buf, _op = mpi_buffer(t)
    buf[2] = 5.0
    assert t[2] == 5.0
    assert device_reducible(torch.float32) and device_reducible(torch.int64)
    assert not device_reducible(torch.bfloat16)  # needs a Python op: staged instead
    assert not device_reducible(torch.float16)  # the same Python op reads host memory


def test_choose_algo() -> None:
    assert choose_algo("auto", num_nodes=2, max_local_size=2, num_hosts=2) == "hierarchical"
    assert choose_algo("auto", num_nodes=2, max_local_size=2, num_hosts=1) == "flat"  # pretend
    assert choose_algo("auto", num_nodes=1, max_local_size=4, num_hosts=1) == "flat"
    assert choose_algo("auto", num_nodes=4, max_local_size=1, num_hosts=4) == "flat"
    assert choose_algo("flat", num_nodes=2, max_local_size=2, num_hosts=2) == "flat"
    assert choose_algo("hierarchical", 1, 1, 1) == "hierarchical"
    with pytest.raises(ConfigError, match="--allreduce 'tree'"):
        choose_algo("tree", 1, 1, 1)


def test_wrappers_default_to_staging_for_device_parameters() -> None:
    """No reducer given: host MPI for CPU parameters, staged through host for device ones."""
    from mpi4py import MPI

    from mpitrain.comm.factory import default_reducer
    from mpitrain.comm.reducer import FlatReducer

    cpu = default_reducer(MPI.COMM_SELF, [torch.zeros(2)], overlap=True)
    assert type(cpu) is FlatReducer
    dev = default_reducer(MPI.COMM_SELF, [torch.zeros(2), torch.zeros(2, device="meta")],
                          overlap=True)
    assert isinstance(dev, StagedReducer) and type(dev.inner) is FlatReducer
