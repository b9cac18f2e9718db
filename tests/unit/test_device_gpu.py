"""GPU-only parts of the device paths (copy stream, events, pinned buffers); skipped without CUDA.

Not run in this project's CI (no GPU); run with ``pytest -m gpu`` on a machine with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mpitrain.comm.cuda_aware import mpi_buffer, wait_producer
from mpitrain.comm.staged import CudaCopies, StagedReducer
from tests.unit.test_device_staged import FakeReducer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_staged_on_cuda_sees_the_compute_streams_last_write() -> None:
    log: list[str] = []
    r = StagedReducer(FakeReducer(log))
    a = torch.randn(2048, 2048, device="cuda")
    ts = []
    for k in range(4):  # long kernels queued before each bucket is handed over
        t = (a @ a).sum(0) * 0 + k
        ts.append(t)
    hs = [r.iallreduce_(t, average=False) for t in ts]
    for h in hs:
        h.wait()
    torch.cuda.current_stream().synchronize()
    assert [float(t[0]) for t in ts] == [0.0, 2.0, 4.0, 6.0]
    assert r.pool.pin and all(isinstance(c, CudaCopies) for k, c in r._copies.items() if k != "cpu")


def test_staged_on_cuda_reuses_pinned_buffers() -> None:
    r = StagedReducer(FakeReducer([]))
    for _ in range(3):
        ts = [torch.ones(n, device="cuda") for n in (1000, 3000)]
        for h in [r.iallreduce_(t, average=False) for t in ts]:
            h.wait()
        assert all(bool((t == 2).all()) for t in ts)
    assert r.pool.allocations == 2


def test_device_buffer_is_the_tensor_itself() -> None:
    t = torch.arange(8.0, device="cuda")
    buf, _ = mpi_buffer(t)
    assert buf.data_ptr() == t.data_ptr()
    wait_producer(t)  # event on the current stream, host waits for it only
