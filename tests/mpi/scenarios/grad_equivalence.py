"""N ranks with batch b each == one process with batch N*b (mpitrain's gradient engine).

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/grad_equivalence.py
Prints one "PASS <check>" line per check on rank 0; any failure raises (non-zero exit).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel, DistributedOptimizer
from mpitrain.grad import broadcast_optimizer_state
from mpitrain.runtime.abort import run_mpi

STEPS = 3
B = 8  # per-rank batch
D_IN, D_OUT = 12, 5


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D_IN, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Branchy(nn.Module):
    """``extra`` is used only when asked (rank 0 here); ``never`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D_IN, 16)
        self.extra = nn.Linear(16, 16)
        self.never = nn.Linear(16, 16)
        self.c = nn.Linear(16, D_OUT)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.c(h)


class Bn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no bias in front of BatchNorm: its true gradient is 0, and Adam would turn the
        # rounding noise of its sum (sign set by the summation order) into steps of +-lr
        self.a = nn.Linear(D_IN, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.c = nn.Linear(16, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.bn(self.a(x))))


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * n * B, D_IN, generator=g)
    return x, torch.randn(STEPS * n * B, D_OUT, generator=g)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def make(cls: type[nn.Module], comm: MPI.Intracomm) -> nn.Module:
    torch.manual_seed(100 + comm.rank)  # different init per rank: wrapping must broadcast
    return cls()


def reference(
    model: nn.Module, n: int, *, ghost: bool = False, use_extra_rank: int | None = None,
    lr: float = 0.1, momentum: float = 0.9,
) -> nn.Module:
    """One process, batch n*B (ghost=True: per-rank chunks through BatchNorm, rank-0 buffers)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x, y = data(n)
    for s in range(STEPS):
        xs, ys = x[s * n * B : (s + 1) * n * B], y[s * n * B : (s + 1) * n * B]
        opt.zero_grad()
        if not ghost and use_extra_rank is None:
            mse(model(xs), ys).backward()
        else:
            keep = None
            before = {k: v.clone() for k, v in model.named_buffers()}
            for r in range(n):
                for k, v in model.named_buffers():
                    v.copy_(before[k])
                if use_extra_rank is not None:
                    model.use_extra = r == use_extra_rank  # type: ignore[assignment]
                (mse(model(xs[r * B : (r + 1) * B]), ys[r * B : (r + 1) * B]) / n).backward()
                if r == 0:
                    keep = {k: v.clone() for k, v in model.named_buffers()}
            assert keep is not None
            for k, v in model.named_buffers():
                v.copy_(keep[k])
        opt.step()
    return model


def my_chunk(comm: MPI.Intracomm, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(comm.size)
    lo = (s * comm.size + comm.rank) * B
    return x[lo : lo + B], y[lo : lo + B]


def check_close(comm: MPI.Intracomm, name: str, got: nn.Module, want: nn.Module,
                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(
                a, b, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{name} {k}: {m}"
            )
        else:
            assert torch.equal(a, b), (name, k, a, b)
    # all ranks bitwise identical
    flat = torch.cat([t.detach().double().reshape(-1) for t in got.state_dict().values()])
    ref = flat.clone()
    comm.Bcast(ref.numpy(), root=0)
    assert torch.equal(flat, ref), f"{name}: ranks differ"
    if comm.rank == 0:
        print(f"PASS {name} (n={comm.size})", flush=True)


def train_dp(comm: MPI.Intracomm, cls: type[nn.Module], name: str, *,
             micro: int = 1, hook: str | None = None, bucket_mb: float | None = 0.001,
             rtol: float = 1e-5, atol: float = 1e-6,
             setup: Callable[[nn.Module], None] | None = None,
             ghost: bool = False, use_extra_rank: int | None = None) -> DataParallel:
    model = DataParallel(make(cls, comm), comm=comm, bucket_mb=bucket_mb, hook=hook)
    start = copy.deepcopy(model.module)
    if setup is not None:
        setup(model.module)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s in range(STEPS):
        x, y = my_chunk(comm, s)
        opt.zero_grad()
        m = B // micro
        for i in range(micro):
            ctx = model.no_sync() if i < micro - 1 else _null()
            with ctx:
                (mse(model(x[i * m : (i + 1) * m]), y[i * m : (i + 1) * m]) / micro).backward()
        model.synchronize()
        opt.step()
    want = reference(start, comm.size, ghost=ghost, use_extra_rank=use_extra_rank)
    check_close(comm, name, model.module, want, rtol, atol)
    return model


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def train_hvd_style(comm: MPI.Intracomm, passes: int) -> None:
    torch.manual_seed(7 + comm.rank)
    model = Mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = DistributedOptimizer(opt, named_parameters=model.named_parameters(), comm=comm,
                               backward_passes_per_step=passes)
    from mpitrain.grad import broadcast_parameters
    broadcast_parameters(model.state_dict(), comm, root=0)
    broadcast_optimizer_state(opt, comm, root=0)
    start = copy.deepcopy(model)
    for s in range(STEPS):
        x, y = my_chunk(comm, s)
        opt.zero_grad()
        m = B // passes
        for i in range(passes):
            (mse(model(x[i * m : (i + 1) * m]), y[i * m : (i + 1) * m]) / passes).backward()
        opt.step()
    check_close(comm, f"DistributedOptimizer backward_passes_per_step={passes}", model,
                reference(start, comm.size))


def check_no_allocations(comm: MPI.Intracomm, model: DataParallel) -> None:
    """Buffers stay put and grads alias them across steps; no allocation in synchronize."""
    bufs = {k: v.data_ptr() for k, v in model.engine.plan.buffers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for s in range(2):
        x, y = my_chunk(comm, s)
        opt.zero_grad()  # set_to_none: views come back at the next forward
        mse(model(x), y).backward()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.synchronize()
        allocs = [e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) > 0]
        assert not allocs, [(e.name, e.cpu_memory_usage) for e in allocs]
        opt.step()
    assert bufs == {k: v.data_ptr() for k, v in model.engine.plan.buffers.items()}
    for p, v in zip(model.engine.params, model.engine.plan.views, strict=True):
        assert p.grad is v
    if comm.rank == 0:
        print("PASS zero allocations in synchronize, grads alias buckets", flush=True)


def check_broadcast_optimizer_state(comm: MPI.Intracomm) -> None:
    """After a resume-like divergence, root's moments and hyperparameters reach every rank."""
    torch.manual_seed(3)
    model = Mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * (comm.rank + 1), momentum=0.5 + comm.rank)
    x, y = my_chunk(comm, 0)
    mse(model(x), y).backward()
    opt.step()  # momentum buffers now differ per rank
    broadcast_optimizer_state(opt, comm, root=0)
    mine = (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"],
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    ref = comm.bcast(mine, root=0)
    assert mine[:2] == ref[:2] == (0.1, 0.5), mine[:2]
    for a, b in zip(mine[2], ref[2], strict=True):
        assert torch.equal(a, b)
    if comm.rank == 0:
        print(f"PASS broadcast_optimizer_state (n={comm.size})", flush=True)


def check_wrapper_after_broadcast(comm: MPI.Intracomm) -> None:
    """Wrap, broadcast the state (load_state_dict on non-roots), then a scheduler: replicas
    stay bitwise identical (the wrapper forwards param_groups, never a stale copy)."""
    torch.manual_seed(5)
    model = Mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = DistributedOptimizer(base, named_parameters=model.named_parameters(), comm=comm)
    broadcast_optimizer_state(opt, comm, root=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    for s in range(3):
        x, y = my_chunk(comm, s)
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        sched.step()
    assert abs(base.param_groups[0]["lr"] - 1e-4) < 1e-12, base.param_groups[0]["lr"]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, comm.bcast(flat, root=0)), "replicas differ after StepLR"
    if comm.rank == 0:
        print("PASS DistributedOptimizer forwards param_groups after a state load", flush=True)


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    dp = train_dp(comm, Mlp, "plain")
    check_no_allocations(comm, dp)
    train_dp(comm, Mlp, "plain one bucket", bucket_mb=64)
    train_dp(comm, Mlp, "no_sync accumulation", micro=2)
    train_hvd_style(comm, 2)
    check_broadcast_optimizer_state(comm)
    check_wrapper_after_broadcast(comm)

    def branch(m: nn.Module) -> None:
        m.use_extra = comm.rank == 0  # type: ignore[assignment]

    train_dp(comm, Branchy, "unused branch", setup=branch, use_extra_rank=0)
    train_dp(comm, Bn, "batchnorm buffers", ghost=True)
    train_dp(comm, Mlp, "fp16 hook", hook="fp16", rtol=1e-3, atol=1e-4)
    train_dp(comm, Mlp, "bf16 hook", hook="bf16", rtol=2e-2, atol=2e-3)
    train_dp(comm, Mlp, "fp16-ef hook", hook="fp16-ef", rtol=1e-3, atol=1e-4)
    train_dp(comm, Mlp, "bf16-ef hook", hook="bf16-ef", rtol=2e-2, atol=2e-3)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
