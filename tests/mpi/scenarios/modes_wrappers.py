"""Exchange-mode wrappers driven directly on N ranks against serial references (PASS lines).

* double-buffer (each progress mode, and with delay compensation) equals one-step-stale SGD
  on the average of all ranks' gradients, computed in this process for every rank's batch;
* local SGD (H = 3, optimizer-state averaging on and off) equals a serial simulation of the
  N replicas with a model average every H steps;
* both again through the shared transports: the staged reducer on CPU tensors (bit-equal up
  to 1e-6) and the fp16 compression hook (equal to references that round what travels to
  float16, within float16 rounding of the sum order).

    mpiexec -n 2 python tests/mpi/scenarios/modes_wrappers.py
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from mpitrain.grad.modes.transport import FlatTransport
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


def fp16_mean(xs: list[torch.Tensor]) -> torch.Tensor:
    """What the fp16 hook delivers (up to the sum order): float16 shares summed in float16."""
    parts = [(x / len(xs)).half() for x in xs]
    while len(parts) > 1:  # pairwise, as MPICH's recursive doubling adds for 2^k ranks
        pairs = zip(parts[::2], parts[1::2], strict=True)
        parts = [(a.float() + b.float()).half() for a, b in pairs]
    return parts[0].float()


def rank_grads(m: torch.nn.Module, step: int, size: int) -> list[list[torch.Tensor]]:
    """Each rank's gradients at m's current parameters (per parameter, per rank)."""
    per: list[list[torch.Tensor]] = [[] for _ in m.parameters()]
    for r in range(size):
        m.zero_grad()
        loss(m, *batch(step, r)).backward()
        for i, p in enumerate(m.parameters()):
            assert p.grad is not None
            per[i].append(p.grad.clone())
    return per


def stale_reference(size: int, lam: float, fp16: bool = False) -> list[torch.Tensor]:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    prev_g: list[torch.Tensor] | None = None
    prev_w: list[torch.Tensor] | None = None
    for t in range(STEPS):
        g = [fp16_mean(xs) for xs in rank_grads(m, t, size)] if fp16 else grads(m, t, size)
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


def transport(comm: MPI.Intracomm, kind: str) -> FlatTransport | None:
    """None (the default), ``staged`` (StagedReducer over host MPI) or ``fp16`` (the hook)."""
    from mpitrain.comm.reducer import FlatReducer
    from mpitrain.comm.staged import StagedReducer

    if kind == "default":
        return None
    if kind == "staged":
        return FlatTransport(StagedReducer(FlatReducer(comm.Dup(), overlap=True)))
    return FlatTransport(FlatReducer(comm.Dup(), overlap=True), "fp16")


def run_double_buffer(
    comm: MPI.Intracomm, progress: str, lam: float, kind: str = "default"
) -> list[torch.Tensor]:
    from mpitrain.grad.modes.double_buffer import DoubleBuffer

    w = DoubleBuffer(model(), comm, progress=progress, delay_compensation=lam,
                     transport=transport(comm, kind))
    opt = torch.optim.SGD(w.module.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        loss(w, *batch(t, comm.rank)).backward()
        w.synchronize()
        w.step(opt)
        w.after_step()
        w.zero_grad()
    w.close()
    return [p.detach().clone() for p in w.module.parameters()]


def local_reference(
    size: int, h: int, avg_opt: bool, rank: int, fp16: bool = False
) -> list[torch.Tensor]:
    reps = [model() for _ in range(size)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in reps]
    anchor = [p.detach().clone() for p in reps[0].parameters()]
    for t in range(STEPS):
        for r, (m, o) in enumerate(zip(reps, opts, strict=True)):
            m.zero_grad()
            loss(m, *batch(t, r)).backward()
            o.step()
        if (t + 1) % h == 0:
            with torch.no_grad():
                for i, ps in enumerate(zip(*(m.parameters() for m in reps), strict=True)):
                    if fp16:  # the change since the last average travels, rounded
                        mean = anchor[i] + fp16_mean([p.detach() - anchor[i] for p in ps])
                        anchor[i] = mean.clone()
                    else:
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


def run_local(
    comm: MPI.Intracomm, h: int, avg_opt: bool, kind: str = "default"
) -> list[torch.Tensor]:
    from mpitrain.grad.modes.local_sgd import LocalSGD

    w = LocalSGD(model(), comm, local_steps=h, warmup_steps=0, average_optimizer_state=avg_opt,
                 transport=transport(comm, kind))
    opt = torch.optim.SGD(w.module.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        loss(w, *batch(t, comm.rank)).backward()
        w.synchronize()
        w.step(opt)  # the trainer's call: LocalSGD keeps `opt` to average its state
        w.after_step()
        w.zero_grad()
    return [p.detach().clone() for p in w.module.parameters()]


def check(
    comm: MPI.Intracomm, name: str, got: list[torch.Tensor], ref: list[torch.Tensor],
    tol: float = 1e-6,
) -> None:
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
    ok = comm.allreduce(diff < tol, op=MPI.LAND)
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
    # the shared transports: staged on CPU tensors is exact; fp16 matches a float16-rounding
    # reference summing pairwise like MPICH (exact at n = 2, 4), and differs from float32
    check(comm, "double-buffer staged transport equals one-step-stale SGD",
          run_double_buffer(comm, "poll", 0.0, "staged"), stale_reference(n, 0.0))
    check(comm, "local-sgd staged transport equals replica simulation",
          run_local(comm, 3, False, "staged"), local_reference(n, 3, False, comm.rank))
    db16 = run_double_buffer(comm, "poll", 0.0, "fp16")
    check(comm, "double-buffer fp16 compression equals fp16 stale reference", db16,
          stale_reference(n, 0.0, fp16=True))
    ls16 = run_local(comm, 3, False, "fp16")
    check(comm, "local-sgd fp16 compression equals fp16 replica simulation", ls16,
          local_reference(n, 3, False, comm.rank, fp16=True))
    f32 = stale_reference(n, 0.0)
    lost = max(float((a - b).abs().max()) for a, b in zip(db16, f32, strict=True))
    ok = comm.allreduce(lost > 0, op=MPI.LAND)
    if comm.rank == 0:
        print(f"{'PASS' if ok else 'FAIL'} fp16 hook applied (differs from float32 by "
              f"{lost:.2e})", flush=True)
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
