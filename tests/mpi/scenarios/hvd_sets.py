"""Process sets, errors instead of hangs, uneven join, SyncBatchNorm and optimizer helpers.

Written from Horovod 0.28's documented semantics. Run by hand:
mpiexec -n 2 python tests/mpi/scenarios/hvd_sets.py   (also -n 4; --bench prints COST lines;
--all first runs hvd_ops.py's and hvd_engine.py's groups in the same launch, so torch loads
once)
Rank 0 prints one "PASS <group>" line per group; a failed check raises.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from torch import nn

import mpitrain.horovod as hvd
from mpitrain.runtime.abort import run_mpi


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {hvd.rank()}: {what}")


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    check(a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol),
          f"{what}:\n{a}\n!=\n{b}")


def raises(exc: type[BaseException], fn: object, what: str, needle: str = "") -> str:
    try:
        fn()  # type: ignore[operator]
    except exc as e:
        check(needle in str(e), f"{what}: {needle!r} not in {e}")
        return str(e)
    raise AssertionError(f"rank {hvd.rank()}: {what}: no {exc.__name__}")


def process_set_checks(n: int, r: int, even: hvd.ProcessSet) -> None:
    evens = list(range(0, n, 2))
    check(even.included() == (r in evens) and even.size() == len(evens), "included/size")
    check(even.rank() == (evens.index(r) if r in evens else None), "set rank")
    check(hvd.global_process_set.size() == n and hvd.global_process_set.rank() == r, "global")
    t = torch.full((2,), float(r))
    if r in evens:
        close(hvd.allreduce(t, op=hvd.Sum, process_set=even),
              torch.full((2,), float(sum(evens))), "allreduce on a set")
        root = evens[-1]  # broadcast roots are global ranks
        close(hvd.broadcast(t, root_rank=root, process_set=even), torch.full((2,), float(root)),
              "broadcast on a set")
        g = hvd.allgather(torch.full((1,), r), process_set=even)
        check(g.tolist() == evens, "allgather on a set")
        out = hvd.alltoall(torch.full((len(evens),), r), process_set=even)
        check(out.tolist() == evens, "alltoall on a set")
        rs = hvd.reducescatter(torch.ones(len(evens)), op=hvd.Sum, process_set=even)
        close(rs, torch.full((1,), float(len(evens))), "reducescatter on a set")
        check(hvd.broadcast_object(r, root_rank=root, process_set=even) == root, "object")
        hvd.barrier(process_set=even)
    else:
        msg = raises(ValueError, lambda: hvd.allreduce(t, process_set=even), "outside rank",
                     "not a member of the provided process set")
        check(str(r) in msg, "the error names the rank")
        raises(ValueError, lambda: hvd.barrier(process_set=even), "outside barrier", "member")
    # dynamic sets: every rank adds and removes together
    odd = hvd.add_process_set([k for k in range(n) if k % 2] or [0])
    check(odd.process_set_id not in (None, 0, even.process_set_id), "new id")
    if odd.included():
        hvd.allreduce(t, process_set=odd)
    set_optimizer_checks(r, [even, odd])
    check(hvd.remove_process_set(odd) and odd.process_set_id is None, "removed")
    raises(ValueError, lambda: hvd.allreduce(t, process_set=odd), "removed set", "registered")
    raises(ValueError, lambda: hvd.add_process_set(list(range(0, n, 2))), "duplicate set",
           "already registered")
    # the optimizer and broadcasts take process_set too
    if r in evens:
        model = nn.Linear(2, 1)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0, process_set=even)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                       model.named_parameters(), process_set=even)
        w0 = model.weight.detach().clone()
        model(torch.full((1, 2), float(r + 1))).sum().backward()
        opt.step()
        mean = sum(k + 1 for k in evens) / len(evens)
        close(model.weight.detach(), w0 - mean, "optimizer averages over the set")


def set_optimizer_checks(r: int, sets: list[hvd.ProcessSet]) -> None:
    """Horovod client code: every rank wraps one model per set; a set's members average their
    gradients over that set alone while the other set trains its own model, and a rank outside
    a set steps on its own gradients (as Horovod's optimizer does). The reference averages the
    members' gradients by hand."""
    def loss(m: nn.Module, k: int, step: int) -> torch.Tensor:
        x = torch.arange(6.0).reshape(2, 3) * (k + 1) / 10 - step / 10
        return m(x).pow(2).sum()

    torch.manual_seed(0)
    runs = []
    for ps in sets:
        model = nn.Linear(3, 2)
        ref = nn.Linear(3, 2)
        ref.load_state_dict(model.state_dict())
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=model.named_parameters(), process_set=ps)
        runs.append((ps, model, opt, ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)))
    for step in range(3):
        for ps, model, opt, ref, ref_opt in runs:
            opt.zero_grad()
            loss(model, r, step).backward()
            opt.step()
            grads = []
            for k in ps.ranks if ps.included() and ps.ranks else [r]:
                ref.zero_grad()
                loss(ref, k, step).backward()
                grads.append([p.grad.clone() for p in ref.parameters() if p.grad is not None])
            for p, gs in zip(ref.parameters(), zip(*grads, strict=True), strict=True):
                p.grad = sum(gs[1:], gs[0]) / len(gs)
            ref_opt.step()
    for ps, model, _, ref, _ in runs:
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            close(p.detach(), q.detach(), f"optimizer on set {ps.ranks} (member: {ps.included()})")


def error_checks(n: int, r: int) -> None:
    cases = {
        "shape": lambda: hvd.allreduce(torch.ones(r + 1)),
        "dtype": lambda: hvd.allreduce(torch.ones(2, dtype=torch.float32 if r else torch.int32)),
        "op": lambda: hvd.allreduce(torch.ones(2), op=hvd.Sum if r else hvd.Max),
        "root": lambda: hvd.broadcast(torch.ones(2), root_rank=r),
        "name": lambda: hvd.allreduce(torch.ones(2), name=f"name{r}"),
        "kind": lambda: (hvd.allreduce if r else hvd.allgather)(torch.ones(2)),
        "prescale": lambda: hvd.allreduce(torch.ones(2), prescale_factor=1.0 + r),
        "gather dims": lambda: hvd.allgather(torch.ones(2, r + 1)),
        "gather ndim": lambda: hvd.allgather(torch.ones([2] * (r % 2 + 1))),
        "rs op": lambda: hvd.reducescatter(torch.ones(n), op=hvd.Min),
        "rs shape": lambda: hvd.reducescatter(torch.ones(n + r)),
        "grouped count": lambda: hvd.grouped_allreduce([torch.ones(1)] * (r + 1)),
        "async": lambda: hvd.synchronize(hvd.allreduce_async(torch.ones(r + 1))),
    }
    for label, fn in cases.items():
        hvd.barrier()
        t0 = time.monotonic()
        msg = raises(hvd.HorovodInternalError, fn, label)
        check(time.monotonic() - t0 < 5, f"{label}: took too long")
        msgs = hvd.allgather_object(msg)
        check(all(m == msg for m in msgs), f"{label}: ranks raised different errors {msgs}")
        if r == 0:
            print(f"  {label}: {msg}", flush=True)
    # argument errors (alltoall splits, a root outside the set) are ValueErrors raised on
    # the calling rank alone, before any exchange: hvd_ops.py client_semantics_checks
    # local problems on one rank: Horovod's ValueError, raised on every rank
    for label, fn in {
        "dtype one rank": lambda: hvd.allreduce(torch.ones(2, dtype=torch.complex64 if r
                                                           else torch.float32)),
        "non-contiguous in place": lambda: hvd.allreduce_(torch.ones(2, 2).t() if r
                                                          else torch.ones(2, 2)),
    }.items():
        msg = raises(ValueError, fn, label)
        check(all(m == msg for m in hvd.allgather_object(msg)), f"{label}: same error")
    # a name in flight cannot be reused until synchronized
    h = hvd.allreduce_async(torch.ones(2), name="dup")
    raises(ValueError, lambda: hvd.allreduce_async(torch.ones(2), name="dup"), "dup",
           "same name")
    hvd.synchronize(h)
    hvd.synchronize(hvd.allreduce_async(torch.ones(2), name="dup"))
    # the context still works after errors
    close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(n)), "after errors")


def join_checks(n: int, r: int) -> None:
    # rank r does r + 1 all-reduces; joined ranks contribute zeros
    for k in range(1, r + 2):
        active = n - (k - 1)
        close(hvd.allreduce(torch.ones(3), op=hvd.Sum), torch.full((3,), float(active)),
              f"join sum step {k}")
        close(hvd.allreduce(torch.ones(3)), torch.full((3,), active / n), "join average")
        a, b = hvd.grouped_allreduce([torch.ones(1), torch.ones(2, dtype=torch.int64)],
                                     op=hvd.Sum)
        check(int(b[0]) == active and float(a[0]) == active, "join grouped")
        if k > 1:
            raises(hvd.HorovodInternalError, lambda: hvd.allgather(torch.ones(1)),
                   "allgather while joined", "not supported with Join")
    check(hvd.join() == n - 1, "join returns the last rank to join")
    # the optimizer: rank r takes r + 1 steps, each gradient is 1 (Average over all n ranks)
    w = nn.Parameter(torch.zeros(1))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=1.0), [("w", w)])
    for _ in range(r + 1):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    want = -sum((n - k) / n for k in range(r + 1))
    close(w.detach(), torch.full((1,), want), "optimizer steps with joined ranks")
    check(hvd.join() == n - 1, "join after the optimizer")


def sync_bn_checks(n: int, r: int) -> None:
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4) * (k + 1) + k for k in range(n)]
    gs = [torch.randn(2, 3, 4) for _ in range(n)]
    ref = nn.BatchNorm1d(3)
    bn = hvd.SyncBatchNorm(3)
    with torch.no_grad():
        for m in (ref, bn):
            m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            m.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x_all = torch.cat(xs).requires_grad_()
    ref_out = ref(x_all)
    (ref_out * torch.cat(gs)).sum().backward()
    x = xs[r].clone().requires_grad_()
    out = bn(x)
    (out * gs[r]).sum().backward()
    close(out.detach(), ref_out.detach()[2 * r:2 * r + 2], "SyncBatchNorm output", 1e-4)
    assert x.grad is not None and x_all.grad is not None
    close(x.grad, x_all.grad[2 * r:2 * r + 2], "SyncBatchNorm input grad", 1e-4)
    wg = hvd.allreduce(bn.weight.grad, op=hvd.Sum)
    close(wg, ref.weight.grad, "SyncBatchNorm weight grad (summed over ranks)", 1e-4)
    close(bn.running_mean, ref.running_mean, "running mean", 1e-4)
    close(bn.running_var, ref.running_var, "running var", 1e-4)
    bn.eval()
    close(bn(x).detach(), ref.eval()(xs[r]).detach(), "eval uses running stats", 1e-4)


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adamax": lambda p: torch.optim.Adamax(p),
    "ASGD": lambda p: torch.optim.ASGD(p),
    "NAdam": lambda p: torch.optim.NAdam(p),
    "RAdam": lambda p: torch.optim.RAdam(p),
    "RMSprop": lambda p: torch.optim.RMSprop(p, momentum=0.5),
    "Rprop": lambda p: torch.optim.Rprop(p),
    "LBFGS": lambda p: torch.optim.LBFGS(p, history_size=3, max_iter=2),
}


def optimizer_checks(n: int, r: int) -> None:
    for name, make in OPTIMIZERS.items():
        p = nn.Parameter(torch.full((3,), float(r)))
        opt = make([p])
        for g in opt.param_groups:
            g["lr"] = 0.01 * (r + 1)
        for _ in range(r + 1):
            def closure(opt: torch.optim.Optimizer = opt, p: torch.Tensor = p) -> torch.Tensor:
                opt.zero_grad()
                loss = ((p - r) ** 2).sum() + p.sum() * (r + 1)
                loss.backward()
                return loss
            opt.step(closure)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        mine = opt.state_dict()
        root = hvd.broadcast_object(mine, root_rank=0)
        check(mine["param_groups"] == root["param_groups"], f"{name}: hyperparameters")
        for key, val in root["state"][0].items():
            got = mine["state"][0][key]
            same = torch.equal(got, val) if isinstance(val, torch.Tensor) else got == val
            check(bool(same), f"{name}: state {key}")
    model = nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    dup = [("a", model.weight), ("a", model.bias)]
    raises(ValueError, lambda: hvd.DistributedOptimizer(base, dup), "duplicates", "unique")
    raises(ValueError, lambda: hvd.DistributedOptimizer(base, [("w", model.weight)]),
           "unnamed", "not named")
    raises(ValueError, lambda: hvd.DistributedOptimizer(base, model.named_parameters(),
                                                        op=hvd.Sum,
                                                        gradient_predivide_factor=2.0),
           "predivide with Sum", "gradient_predivide_factor")
    raises(ValueError, lambda: hvd.DistributedOptimizer(base, model.named_parameters(),
                                                        groups="x"), "groups", "groups")
    raises(NotImplementedError, lambda: hvd.DistributedOptimizer(base, op=hvd.Adasum),
           "Adasum", "Adasum")
    # predivide splits the average: same result; groups/num_groups accepted
    results = []
    for kw in ({}, {"gradient_predivide_factor": 2.0}, {"groups": [[model.weight]]},
               {"num_groups": 2}):
        m = nn.Linear(2, 2)
        with torch.no_grad():
            m.weight.fill_(1.0)
            m.bias.fill_(0.0)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=1.0),
                                       m.named_parameters(), **kw)  # type: ignore[arg-type]
        m(torch.full((1, 2), float(r + 1))).sum().backward()
        opt.step()
        results.append(m.weight.detach().clone())
    for res in results[1:]:
        close(res, results[0], "optimizer extras give the same update")
    hvd.broadcast_parameters(list(model.parameters()), root_rank=0)


def same_on_every_rank(t: torch.Tensor, what: str) -> None:
    """Bitwise-identical replicas: every rank's tensor equals rank 0's."""
    root = hvd.broadcast_object(t.detach().clone(), root_rank=0)
    check(torch.equal(t.detach(), root), f"{what}: replica differs from rank 0's")


def wrapper_checks(n: int, r: int) -> None:
    """The wrapper forwards param_groups/state; a fresh optimizer is stepped as Horovod does."""
    # Horovod's recipe: wrap, broadcast the optimizer state, then an LR scheduler (the
    # broadcast's load_state_dict replaces the wrapped optimizer's param_groups)
    for how in ("broadcast", "load_state_dict"):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = hvd.DistributedOptimizer(base, model.named_parameters())
        if how == "broadcast":
            hvd.broadcast_optimizer_state(opt, root_rank=0)
        else:
            opt.load_state_dict(base.state_dict())
        check(opt.param_groups is base.param_groups and opt.state is base.state
              and opt.defaults is base.defaults, f"{how}: wrapper forwards, never copies")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        for step in range(3):
            x = torch.full((8, 4), float(r + step + 1))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
        check(abs(base.param_groups[0]["lr"] - 1e-4) < 1e-12,
              f"{how}: wrapped optimizer steps with the scheduled lr")
        same_on_every_rank(model.weight, f"{how} then StepLR")
    # a fresh optimizer: Horovod steps once on zero gradients before broadcasting
    for name, make in (
        ("SGD", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)),
        ("Adam", lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1)),
        ("AdamW", lambda p: torch.optim.AdamW(p, lr=0.1)),
    ):
        torch.manual_seed(1)
        model = nn.Linear(3, 2)
        ref = nn.Linear(3, 2)
        ref.load_state_dict(model.state_dict())
        ref_opt = make(list(ref.parameters()))
        for p in ref.parameters():
            p.grad = torch.zeros_like(p)
        ref_opt.step()  # the single-process reference of Horovod's initialisation
        opt = hvd.DistributedOptimizer(make(list(model.parameters())), model.named_parameters())
        if name == "SGD":
            hvd.broadcast_optimizer_state(opt, 0, model)  # Horovod's positional model
        else:
            hvd.broadcast_optimizer_state(opt, root_rank=0, model=model)
        check(torch.equal(model.weight, ref.weight), f"{name}: zero-gradient step as Horovod")
        state = opt.state_dict()["state"]
        check(len(state) == 2, f"{name}: state initialised")
        if name != "SGD":
            check(float(state[0]["step"]) == 1.0, f"{name}: step 1 after initialisation")
        # the wrapper still exchanges gradients after the local initialisation step
        opt.zero_grad()
        model(torch.full((2, 3), float(r + 1))).sum().backward()
        opt.step()
        same_on_every_rank(model.weight, f"{name}: step after initialisation")
    raises(ValueError, lambda: hvd.broadcast_optimizer_state(
        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), 0, model="x"),
        "model type", "nn.Module")


def bench(n: int, r: int) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    t = torch.ones(1)
    arr = t.numpy()
    big = torch.ones(1 << 18)  # 1 MiB of float32
    big_arr = big.numpy()
    iters = 2000
    for label, fn in (
        ("raw MPI Allreduce (1 float)", lambda: comm.Allreduce(MPI.IN_PLACE, arr)),
        ("hvd.allreduce_ (1 float)", lambda: hvd.allreduce_(t, op=hvd.Sum)),
        ("hvd.barrier (negotiation only)", hvd.barrier),
        ("hvd.allreduce_async_ + synchronize (1 float)",
         lambda: hvd.synchronize(hvd.allreduce_async_(t, op=hvd.Sum))),
        ("raw MPI Allreduce (1 MiB)", lambda: comm.Allreduce(MPI.IN_PLACE, big_arr)),
        ("hvd.allreduce_ (1 MiB)", lambda: hvd.allreduce_(big, op=hvd.Sum)),
    ):
        if "MiB" in label:
            iters = 200
        for _ in range(100):
            fn()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        dt = (time.perf_counter() - t0) / iters * 1e6
        worst = comm.allreduce(dt, op=MPI.MAX)
        if r == 0:
            print(f"COST {label}: {worst:.1f} us per call at {n} ranks", flush=True)
    comm.Free()


def main(comm: object) -> int:
    """Run every group (hvd.init() on COMM_WORLD with a process set of the even ranks)."""
    from mpi4py import MPI

    torch.set_num_threads(1)
    n0 = MPI.COMM_WORLD.size
    even = hvd.ProcessSet(range(0, n0, 2))
    hvd.init(process_sets=[even])
    n, r = hvd.size(), hvd.rank()
    if "--bench" in sys.argv:
        bench(n, r)
        hvd.shutdown()
        return 0
    if "--all" in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import hvd_engine
        import hvd_ops

        hvd_ops.run_groups(n, r)
        hvd_engine.run_groups(n, r)
    groups = [
        ("process sets", lambda: process_set_checks(n, r, even)),
        ("errors on every rank", lambda: error_checks(n, r)),
        ("SyncBatchNorm", lambda: sync_bn_checks(n, r)),
        ("broadcast_optimizer_state and DistributedOptimizer", lambda: optimizer_checks(n, r)),
        ("optimizer wrapper forwards state", lambda: wrapper_checks(n, r)),
        ("uneven join", lambda: join_checks(n, r)),
    ]
    for label, fn in groups:
        hvd.barrier()
        t0 = time.perf_counter()
        fn()
        if r == 0:
            print(f"PASS {label} ({time.perf_counter() - t0:.2f} s)", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
