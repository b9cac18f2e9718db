"""Exchange modes on one rank (COMM_SELF): double buffering equals a one-step-stale SGD
reference, local SGD's counters, delay compensation's formula, checkpoint state round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from mpi4py import MPI

from mpitrain.grad.modes.double_buffer import DoubleBuffer
from mpitrain.grad.modes.local_sgd import LocalSGD


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(m(x), y)


def _stale_reference(steps: int, lam: float = 0.0) -> list[torch.Tensor]:
    """w_{t+1} = opt(w_t, g_{t-1}) with g_{-1} = 0, optionally delay-compensated."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    prev_g: list[torch.Tensor] | None = None
    prev_w: list[torch.Tensor] | None = None
    for x, y in _batches(steps):
        m.zero_grad()
        _loss(m, x, y).backward()
        g_now = [p.grad.clone() for p in m.parameters()]  # type: ignore[union-attr]
        w_now = [p.detach().clone() for p in m.parameters()]
        for i, p in enumerate(m.parameters()):
            if prev_g is None:
                p.grad = torch.zeros_like(p)
            else:
                g = prev_g[i].clone()
                if lam and prev_w is not None:
                    g = g + lam * g * g * (w_now[i] - prev_w[i])
                p.grad = g
        opt.step()
        prev_g, prev_w = g_now, w_now
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("progress", ["poll", "thread", "none"])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_double_buffer_equals_one_step_stale_sgd(progress: str, lam: float) -> None:
    steps = 6
    ref = _stale_reference(steps, lam)
    model = DoubleBuffer(_model(), MPI.COMM_SELF, progress=progress, delay_compensation=lam)
    opt = torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(steps):
        _loss(model, x, y).backward()
        model.synchronize()
        model.step(opt)
        model.after_step()
        model.zero_grad()
    model.close()
    for a, b in zip(model.module.parameters(), ref, strict=True):
        assert torch.equal(a.detach(), b)


def test_double_buffer_checkpoint_round_trip_continues_bitwise() -> None:
    batches = _batches(6)

    def run(split: int | None) -> list[torch.Tensor]:
        model = DoubleBuffer(_model(), MPI.COMM_SELF)
        opt = torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9)
        for i, (x, y) in enumerate(batches):
            if i == split:
                saved = copy.deepcopy(
                    (model.exchange_state_dict(), model.module.state_dict(), opt.state_dict())
                )
                model.close()
                model = DoubleBuffer(_model(), MPI.COMM_SELF)
                opt = torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9)
                model.module.load_state_dict(saved[1])
                opt.load_state_dict(saved[2])
                model.load_exchange_state_dict(saved[0])
            _loss(model, x, y).backward()
            model.synchronize()
            opt.step()
            model.zero_grad()
        model.close()
        return [p.detach().clone() for p in model.module.parameters()]

    for a, b in zip(run(None), run(3), strict=True):
        assert torch.equal(a, b)


def test_local_sgd_counts_and_warmup() -> None:
    model = LocalSGD(_model(), MPI.COMM_SELF, local_steps=3, warmup_steps=2)
    opt = torch.optim.SGD(model.module.parameters(), lr=0.1)
    for x, y in _batches(8):
        _loss(model, x, y).backward()
        model.synchronize()
        model.step(opt)
        model.after_step()
        model.zero_grad()
    # 2 warm-up steps, then 6 local steps = 2 averages
    assert model.steps == 8 and model.averages == 2
    assert model.metrics() == {"local_steps_since_average": 0.0}
    st = model.exchange_state_dict()
    assert st is not None and st["steps"] == 8 and len(st["ranks"]) == 1
