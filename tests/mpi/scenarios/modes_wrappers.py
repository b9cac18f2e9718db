"""Exchange-mode wrappers driven directly on N ranks against serial references (PASS lines).

* double-buffer (each progress mode, and with delay compensation) equals one-step-stale SGD
  on the average of all ranks' gradients, computed in this process for every rank's batch;
* local SGD (H = 3, optimizer-state averaging on and off) equals a serial simulation of the
  N replicas with a model average every H steps.

    mpiexec -n 2 python tests/mpi/scenarios/modes_wrappers.py
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi

STEPS = 7


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)


def loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(m(x), y)


def grads(m: torch.nn.Module, step: int, size: int) -> list[torch.Tensor]:
    """Average over ranks of the gradients at m's current parameters."""
    acc = [torch.zeros_like(p) for p in m.parameters()]
    for r in range(size):
        m.zero_grad()
        loss(m, *batch(step, r)).backward()
        for a, p in zip(acc, m.parameters(), strict=True):
            assert p.grad is not None
            a += p.grad
    return [a / size for a in acc]


def stale_reference(size: int, lam: float) -> list[torch.Tensor]:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    prev_g: list[torch.Tensor] | None = None
    prev_w: list[torch.Tensor] | None = None
    for t in range(STEPS):
        g = grads(m, t, size)
        w = [p.detach().clone() for p in m.parameters()]
        apply = [torch.zeros_like(x) for x in g] if prev_g is None else prev_g
        if prev_g is not None and lam > 0 and prev_w is not None:
            pairs = zip(apply, w, prev_w, strict=True)
            apply = [a + lam * a * a * (wn - wp) for a, wn, wp in pairs]
        for p, a in zip(m.parameters(), apply, strict=True):
            p.grad = a.clone()
        opt.step()
        prev_g, prev_w = g, w
    return [p.detach().clone() for p in m.parameters()]


def run_double_buffer(comm: MPI.Intracomm, progress: str, lam: float) -> list[torch.Tensor]:
    from mpitrain.grad.modes.double_buffer import DoubleBuffer

    w = DoubleBuffer(model(), comm, progress=progress, delay_compensation=lam)
    opt = torch.optim.SGD(w.module.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        loss(w, *batch(t, comm.rank)).backward()
        w.synchronize()
        opt.step()
        w.zero_grad()
    w.close()
    return [p.detach().clone() for p in w.module.parameters()]


def local_reference(size: int, h: int, avg_opt: bool, rank: int) -> list[torch.Tensor]:
    reps = [model() for _ in range(size)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in reps]
    for t in range(STEPS):
        for r, (m, o) in enumerate(zip(reps, opts, strict=True)):
            m.zero_grad()
            loss(m, *batch(t, r)).backward()
            o.step()
        if (t + 1) % h == 0:
            with torch.no_grad():
                for ps in zip(*(m.parameters() for m in reps), strict=True):
                    mean = sum(p.detach().clone() for p in ps) / size
                    for p in ps:
                        p.copy_(mean)
                if avg_opt:
                    for ps in zip(*(m.parameters() for m in reps), strict=True):
                        state = zip(opts, ps, strict=True)
                        bufs = [o.state[p]["momentum_buffer"] for o, p in state]
                        mean = sum(b.clone() for b in bufs) / size
                        for b in bufs:
                            b.copy_(mean)
    return [p.detach().clone() for p in reps[rank].parameters()]


def run_local(comm: MPI.Intracomm, h: int, avg_opt: bool) -> list[torch.Tensor]:
    from mpitrain.grad.modes.local_sgd import LocalSGD

    w = LocalSGD(model(), comm, local_steps=h, warmup_steps=0, average_optimizer_state=avg_opt)
    opt = torch.optim.SGD(w.module.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        loss(w, *batch(t, comm.rank)).backward()
        w.synchronize()
        w.step(opt)  # the trainer's call: LocalSGD keeps `opt` to average its state
        w.after_step()
        w.zero_grad()
    return [p.detach().clone() for p in w.module.parameters()]


def check(comm: MPI.Intracomm, name: str, got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
    ok = comm.allreduce(diff < 1e-6, op=MPI.LAND)
    if comm.rank == 0:
        print(f"{'PASS' if ok else 'FAIL'} {name} (n={comm.size}, max diff {diff:.2e})", flush=True)


def main(comm: MPI.Intracomm) -> int:
    n = comm.size
    for progress in ("poll", "thread", "none"):
        check(comm, f"double-buffer {progress} equals one-step-stale SGD",
              run_double_buffer(comm, progress, 0.0), stale_reference(n, 0.0))
    check(comm, "double-buffer delay compensation equals DC reference",
          run_double_buffer(comm, "poll", 0.5), stale_reference(n, 0.5))
    for avg_opt in (False, True):
        check(comm, f"local-sgd H=3 average_optimizer={avg_opt} equals replica simulation",
              run_local(comm, 3, avg_opt), local_reference(n, 3, avg_opt, comm.rank))
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
