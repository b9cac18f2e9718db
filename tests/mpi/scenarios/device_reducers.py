"""Device-path scenario (run with 4 ranks and MPITRAIN_RANKS_PER_NODE=2).

    MPITRAIN_RANKS_PER_NODE=2 OMP_NUM_THREADS=1 mpiexec -n 4 python \
        tests/mpi/scenarios/device_reducers.py

Checks: hierarchical (both variants, 2x2 / 4x1 / 1x4 pretend nodes) equals flat; staged on
CPU tensors equals the direct path bitwise and reuses its buffers; the CUDA-aware reducer's
code path on CPU equals flat bitwise; make_reducer stacks; decide_cuda_aware agrees across
ranks (probe injected, wrong values on one rank forces no everywhere); bind_device agrees.
Rank 0 prints ``OK <check>`` per check.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import torch
from mpi4py import MPI

from mpitrain.comm.cuda_aware import CudaAwareReducer, DirectReducer
from mpitrain.comm.factory import describe, make_reducer
from mpitrain.comm.hierarchical import HierarchicalReducer
from mpitrain.comm.reducer import FlatReducer, Reducer
from mpitrain.comm.staged import StagedReducer
from mpitrain.errors import CommError, DeviceError
from mpitrain.grad.parallel import DataParallel
from mpitrain.runtime.abort import abort_job, run_mpi
from mpitrain.runtime.cuda_aware import (
    QueryResult,
    decide_cuda_aware,
    probe_allreduce,
)
from mpitrain.runtime.device import DeviceFacts, bind_device
from mpitrain.runtime.world import World

CASES = [
    (torch.float32, 1),
    (torch.float32, 7),
    (torch.float32, 1001),
    (torch.float32, (1 << 18) + 3),
    (torch.float64, 1001),
    (torch.int64, 1001),
    (torch.float16, 64),
    (torch.bfloat16, 999),
]


def pattern(rank: int, n: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + n + salt)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not a.dtype.is_floating_point:
        assert torch.equal(a, b), what
        return
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(a.dtype, 2e-2)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def reduced(r: Reducer, x: torch.Tensor, average: bool) -> torch.Tensor:
    y = x.clone()
    r.allreduce_(y, average=average)
    return y


def check_hierarchical(comm: MPI.Intracomm, rpn: int, say: Callable[[str], None]) -> None:
    w = World.create(comm, ranks_per_node=rpn)
    assert (w.num_nodes, w.local_size) == (4 // rpn, rpn), w.describe()
    flat = FlatReducer(w.comm, overlap=True)
    # pipeline 1 KiB: larger tensors go as queued pieces (the pipelined path)
    for variant, pipe in (("reduce_bcast", 1 << 20), ("rs_ag", 1 << 20), ("auto", 1 << 20),
                          ("rs_ag", 1024), ("reduce_bcast", 1024)):
        h = HierarchicalReducer.create(w, variant=variant, rs_ag_min_bytes=4096,
                                       pipeline_bytes=pipe)
        for dtype, n in CASES:
            for average in (False, True):
                x = pattern(w.rank, n, dtype)
                ref = reduced(flat, x, average)
                close(reduced(h, x, average), ref, f"{variant} blocking {dtype} {n}")
                y = x.clone()
                h.iallreduce_(y, average=average).wait()
                close(y, ref, f"{variant} non-blocking {dtype} {n}")
        # several in flight, polled and waited out of order: FIFO stage order keeps it right
        xs = [pattern(w.rank, n, torch.float32, salt=i) for i, n in enumerate((5, 3000, 70000, 9))]
        refs = [reduced(flat, x, True) for x in xs]
        handles = [h.iallreduce_(x, average=True) for x in xs]
        handles[2].test()
        for hd in reversed(handles):
            hd.wait()
        for i, (x, ref) in enumerate(zip(xs, refs, strict=True)):
            close(x, ref, f"{variant} in-flight {i}")
        h.free()
    say(f"hierarchical == flat for 4 ranks as {4 // rpn}x{rpn} (reduce_bcast, rs_ag, auto)")
    w.free()


def check_uneven_nodes(comm: MPI.Intracomm, say: Callable[[str], None]) -> None:
    """3 + 1 ranks per node: every rank cuts the same pipeline pieces (a rank alone on its node
    once cut none while the others cut four: mismatched collectives)."""
    own = comm.Dup()
    node = own.Split(0 if own.rank < 3 else 1, own.rank)
    cross = own.Split(node.rank, own.rank)
    index = node.bcast(cross.rank if node.rank == 0 else None, root=0)
    nodes = node.bcast(cross.size if node.rank == 0 else None, root=0)
    w = World(comm=own, node_comm=node, cross_comm=cross, rank=own.rank, size=own.size,
              local_rank=node.rank, local_size=node.size, node_index=int(index),
              num_nodes=int(nodes), hostname="host")
    flat = FlatReducer(w.comm, overlap=True)
    h = HierarchicalReducer.create(w, variant="auto", pipeline_bytes=1024)
    for n in (3000, 70000):
        x = pattern(w.rank, n, torch.float32)
        ref = reduced(flat, x, True)
        close(reduced(h, x, True), ref, f"uneven blocking {n}")
        y = x.clone()
        h.iallreduce_(y, average=True).wait()
        close(y, ref, f"uneven non-blocking {n}")
    h.free()
    w.free()
    say("hierarchical == flat on uneven nodes (3 + 1), pipelined")


def check_staged_and_direct(w: World, say: Callable[[str], None]) -> None:
    flat = FlatReducer(w.comm, overlap=True)
    staged = StagedReducer(FlatReducer(w.comm.Dup(), overlap=True))
    for step in range(3):
        xs = [pattern(w.rank, n, dt, salt=step) for dt, n in CASES]
        refs = [reduced(flat, x, True) for x in xs]
        handles = [staged.iallreduce_(x, average=True) for x in xs]
        handles[0].test()  # may start/complete the head; must not break the order
        for hd in handles:
            hd.wait()
        for x, ref in zip(xs, refs, strict=True):
            assert torch.equal(x, ref), f"staged != direct bitwise ({x.dtype}, {x.numel()})"
        if step == 0:
            allocated = staged.pool.allocations
    assert staged.pool.allocations == allocated == len(CASES), staged.pool.allocations
    say("staged (CPU, forced) == direct bitwise; buffers allocated once and reused")

    hier = HierarchicalReducer.create(w, variant="auto", rs_ag_min_bytes=4096)
    staged_h = StagedReducer(HierarchicalReducer.create(w, variant="auto", rs_ag_min_bytes=4096))
    for dt, n in CASES:
        x = pattern(w.rank, n, dt)
        assert torch.equal(reduced(staged_h, x, True), reduced(hier, x, True)), (dt, n)
    say("staged over hierarchical == hierarchical bitwise")

    aware = CudaAwareReducer(DirectReducer(w.comm.Dup()))
    for dt, n in CASES:
        x = pattern(w.rank, n, dt)
        assert torch.equal(reduced(aware, x, False), reduced(flat, x, False)), (dt, n)
    say("CUDA-aware reducer code path on CPU == flat bitwise")

    cpu = torch.device("cpu")
    stacks = {}
    for algo in ("flat", "hierarchical", "auto"):
        for staged_flag in (None, True):
            r = make_reducer(w, device=cpu, cuda_aware=None, algo=algo, staged=staged_flag)
            stacks[(algo, staged_flag)] = describe(r)
            x = pattern(w.rank, 5000, torch.float32)
            close(reduced(r, x, True), reduced(flat, x, True), f"make_reducer {algo} {staged_flag}")
    assert stacks[("flat", None)] == "Flat", stacks
    assert stacks[("auto", None)] == "Flat", stacks  # pretend nodes on one host: flat wins
    assert stacks[("hierarchical", True)] == "Staged(Hierarchical[auto])", stacks
    say(f"make_reducer stacks {sorted(set(stacks.values()))}")


def engine_grads(w: World, reducer: Reducer | None, hook: str | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    )  # fmt: skip
    dp = DataParallel(model, comm=w.comm, bucket_mb=0.005, hook=hook, reducer=reducer)
    assert len(dp.engine.buckets) > 2, dp.engine.describe()
    g = torch.Generator().manual_seed(w.rank)
    grads: list[torch.Tensor] = []
    for _step in range(2):
        model.zero_grad(set_to_none=False)
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 3, (8,), generator=g)
        torch.nn.functional.cross_entropy(dp(x), y).backward()
        dp.synchronize()
        grads += [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return grads


def check_engine(w: World, say: Callable[[str], None]) -> None:
    cpu = torch.device("cpu")
    for hook in (None, "bf16", "fp16-ef"):
        ref = engine_grads(w, None, hook)
        staged = make_reducer(w, device=cpu, cuda_aware=None, algo="flat", staged=True)
        got = engine_grads(w, staged, hook)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), hook
        hier = make_reducer(w, device=cpu, cuda_aware=None, algo="hierarchical", staged=True)
        got = engine_grads(w, hier, hook)
        tol = 1e-5 if hook is None else 2e-2
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    say("engine + hooks (none, bf16, fp16-ef) on staged == flat bitwise, staged hierarchical close")


def check_decision(w: World, say: Callable[[str], None]) -> None:
    comm = w.comm
    assert not decide_cuda_aware(comm, torch.device("cpu"), "auto").use_cuda_aware
    assert probe_allreduce(comm, torch.device("cpu")) == "ok"
    cuda = torch.device("cuda")
    yes, no = QueryResult(True, "injected yes"), QueryResult(False, "injected no")

    def never(_c: MPI.Intracomm, _d: torch.device) -> str:
        raise AssertionError("probe must not run when the library says no")

    d = decide_cuda_aware(comm, cuda, "auto", probe=never, query=no, environ={})  # type: ignore[arg-type]
    assert not d.use_cuda_aware and d.probe == "skipped"
    d = decide_cuda_aware(comm, cuda, "auto", probe=lambda c, _d: "ok", query=yes, environ={})
    assert d.use_cuda_aware and d.probe == "ok", d

    def wrong_on_1(c: MPI.Intracomm, _d: torch.device) -> str:
        return "wrong" if c.rank == 1 else "ok"

    d = decide_cuda_aware(comm, cuda, "auto", probe=wrong_on_1, query=yes, environ={})  # type: ignore[arg-type]
    assert not d.use_cuda_aware and d.probe == "wrong", d
    assert "probe not ok on rank(s) [1]" in d.reasons, d.reasons
    # one rank's library saying no keeps everyone from probing (and from a crash)
    mixed = yes if comm.rank != 2 else no
    d = decide_cuda_aware(comm, cuda, "auto", probe=never, query=mixed, environ={})  # type: ignore[arg-type]
    assert not d.use_cuda_aware
    try:
        decide_cuda_aware(comm, cuda, "yes", probe=wrong_on_1, query=yes, environ={})  # type: ignore[arg-type]
    except CommError as exc:
        assert "--cuda-aware yes" in str(exc) and "rank(s) [1]" in str(exc), exc
    else:
        raise AssertionError("yes with a wrong probe must raise")
    # a hint alone (query unknown) allows the probe
    unknown = QueryResult(None, "no query")
    env = {"MPICH_GPU_SUPPORT_ENABLED": "1"}
    d = decide_cuda_aware(comm, cuda, "auto", probe=lambda c, _d: "ok", query=unknown, environ=env)
    assert d.use_cuda_aware, d
    say("decide_cuda_aware agrees on every rank (query/hint/probe injected)")


def check_binding(w: World, say: Callable[[str], None]) -> None:
    assert bind_device(w, "cpu").type == "cpu"
    assert bind_device(w, "auto", facts=DeviceFacts(False, (), None)).type == "cpu"
    try:
        bind_device(w, "cuda", facts=DeviceFacts(w.rank != 3, (f"GPU-{w.rank}",), None))
    except DeviceError as exc:
        assert str(exc).startswith("rank 3: local rank 1: --device cuda"), exc  # on all ranks
    else:
        raise AssertionError("cuda without a device must fail on every rank")
    two = DeviceFacts(True, ("GPU-a", "GPU-b"), "0,1")
    got = bind_device(w, "cuda", facts=two, set_current=False)
    assert str(got) == f"cuda:{w.local_rank}", got
    own = DeviceFacts(True, (f"GPU-{w.rank}",), "0")  # Slurm: each task sees its own GPU
    assert str(bind_device(w, "cuda", facts=own, set_current=False)) == "cuda:0"
    gpus = ("GPU-0a", "GPU-0b") if w.node_index == 0 else ()
    mixed = DeviceFacts(bool(gpus), gpus, None)  # node 0 has two GPUs, node 1 none
    try:  # --device auto with a node that has no GPU: refused on every rank, not a hang later
        bind_device(w, "auto", facts=mixed, set_current=False)
    except DeviceError as exc:
        assert "ranks [2, 3] got the CPU" in str(exc) and "HINT" in str(exc), exc
    else:
        raise AssertionError("mixed CPU/CUDA ranks under --device auto were accepted")
    say("bind_device: one GPU per local rank, per-task binding, same error on all ranks, "
        "mixed CPU/CUDA refused")


def main(comm: MPI.Intracomm) -> int:
    lines: list[str] = []

    def say(msg: str) -> None:
        lines.append(msg)

    try:
        assert comm.size == 4, "run with 4 ranks"
        w = World.create(comm)  # MPITRAIN_RANKS_PER_NODE=2 -> 2 pretend nodes
        assert (w.num_nodes, w.local_size) == (2, 2), w.describe()
        for rpn in (2, 1, 4):
            check_hierarchical(comm, rpn, say)
        check_uneven_nodes(comm, say)
        check_staged_and_direct(w, say)
        check_engine(w, say)
        check_decision(w, say)
        check_binding(w, say)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(comm, 1)
    if comm.rank == 0:
        for line in lines:
            print(f"OK {line}")
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
