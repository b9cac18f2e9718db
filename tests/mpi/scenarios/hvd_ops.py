"""Every Horovod collective × dtype × dims 1-3: values, shapes, dtypes, in-place, async, grads.

Written from Horovod 0.28's documented semantics. Run by hand:
mpiexec -n 2 python tests/mpi/scenarios/hvd_ops.py   (also -n 4)
Rank 0 prints one "PASS <group> (<count> checks)" line per group; a failed check raises.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch

import mpitrain.horovod as hvd
from mpitrain.runtime.abort import run_mpi

INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPES = INTS + FLOATS
DIMS = [1, 2, 3]
COUNT = {"n": 0}


def check(cond: bool, what: str) -> None:
    COUNT["n"] += 1
    if not cond:
        raise AssertionError(f"rank {hvd.rank()}: {what}")


def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    check(got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}")
    check(tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}")
    tol = 2e-2 if want.dtype in (torch.float16, torch.bfloat16) else 1e-6
    ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    check(ok, f"{what}: values\n{got}\n!=\n{want}")


def value(r: int, dtype: torch.dtype, dim: int, rows: int | None = None) -> torch.Tensor:
    """Rank r's tensor: small integers (negative for signed types), exact in every dtype."""
    shape = [rows if rows is not None else 3] + [2] * (dim - 1)
    base = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    if dtype == torch.uint8:
        v = base % 3 + r + 1
    else:  # sums of odd negative values: Average must truncate toward zero
        v = (base % 5 - 2) * (r + 1) + r
    return v.to(dtype)


def small(t: torch.Tensor) -> torch.Tensor:
    """Clamp for products (no overflow of 8-bit types at 4 ranks)."""
    return t.clamp(1, 2) if t.dtype == torch.uint8 else t.clamp(-2, 2)


def reduce_ref(ts: list[torch.Tensor], op: int) -> torch.Tensor:
    stack = torch.stack([t.double() for t in ts])
    dtype = ts[0].dtype
    if op == hvd.Sum:
        return stack.sum(0).to(dtype)
    if op == hvd.Average:
        s = stack.sum(0) / len(ts)
        return (s if dtype.is_floating_point else torch.trunc(s)).to(dtype)
    if op == hvd.Min:
        return stack.min(0).values.to(dtype)
    if op == hvd.Max:
        return stack.max(0).values.to(dtype)
    return stack.prod(0).to(dtype)


def allreduce_checks(n: int, r: int) -> None:
    ops = [hvd.Average, hvd.Sum, hvd.Min, hvd.Max, hvd.Product]
    for dtype, dim, op in itertools.product(DTYPES, DIMS, ops):
        prep = small if op == hvd.Product else (lambda t: t)
        mine = prep(value(r, dtype, dim))
        want = reduce_ref([prep(value(k, dtype, dim)) for k in range(n)], op)
        keep = mine.clone()
        same(hvd.allreduce(mine, op=op), want, f"allreduce {dtype} {dim}d op{op}")
        check(torch.equal(mine, keep), "allreduce modified its input")
        if dim != 2:  # the in-place and async forms: one dimension count is enough
            continue
        t = mine.clone()
        out = hvd.allreduce_(t, op=op)
        check(out is t, "allreduce_ returns its tensor")
        same(t, want, f"allreduce_ {dtype} {dim}d op{op}")
        h = hvd.allreduce_async(mine, op=op, name=f"ar.{dtype}.{dim}.{op}")
        check(isinstance(h, int), "handles are ints")
        while not hvd.poll(h):
            pass
        same(hvd.synchronize(h), want, "allreduce_async")
        t = mine.clone()
        h = hvd.allreduce_async_(t, op=op)
        res = hvd.synchronize(h)
        check(res is t, "allreduce_async_ result is the tensor")
        same(t, want, "allreduce_async_")
    # average= (deprecated spelling), scale factors, compression
    x = torch.full((4,), float(r + 1))
    same(hvd.allreduce(x, average=False), torch.full((4,), float(n * (n + 1) / 2)), "average=")
    same(hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5),
         torch.full((4,), float(n * (n + 1) / 2)), "pre/post scale")
    i = torch.full((3,), 3 * (r + 1), dtype=torch.int32)
    s = 3 * n * (n + 1) // 2
    same(hvd.allreduce(i, op=hvd.Sum, postscale_factor=0.5),
         torch.full((3,), int(s * 0.5), dtype=torch.int32), "int postscale truncates")
    same(hvd.allreduce(x, compression=hvd.Compression.fp16),
         torch.full((4,), (n + 1) / 2), "fp16 compression keeps dtype")
    try:
        hvd.allreduce(x, op=hvd.Adasum)
    except NotImplementedError as exc:
        check("Adasum" in str(exc), "Adasum error names it")
    else:
        check(False, "Adasum accepted")


def allgather_checks(n: int, r: int) -> None:
    for dtype, dim in itertools.product([*DTYPES, torch.bool], DIMS):
        mine = value(r, dtype, dim, rows=r + 1) if dtype != torch.bool else (
            value(r, torch.int32, dim, rows=r + 1) > 0)
        parts = [value(k, dtype, dim, rows=k + 1) if dtype != torch.bool else
                 (value(k, torch.int32, dim, rows=k + 1) > 0) for k in range(n)]
        same(hvd.allgather(mine), torch.cat(parts), f"allgather {dtype} {dim}d")
        same(hvd.synchronize(hvd.allgather_async(mine)), torch.cat(parts), "allgather_async")
        g = hvd.grouped_allgather([mine, mine[:1]])
        same(g[1], torch.cat([p[:1] for p in parts]), "grouped_allgather")
    h = hvd.grouped_allgather_async([torch.full((1,), r)])
    same(hvd.synchronize(h)[0], torch.arange(n), "grouped_allgather_async")
    check(hvd.allgather_object({"r": r}) == [{"r": k} for k in range(n)], "allgather_object")


def broadcast_checks(n: int, r: int) -> None:
    for dtype, dim, root in itertools.product(DTYPES, DIMS, range(n)):
        mine = value(r, dtype, dim)
        want = value(root, dtype, dim)
        same(hvd.broadcast(mine, root), want, f"broadcast {dtype} {dim}d root {root}")
        if root != n - 1:  # the in-place and async forms: one root is enough
            continue
        t = mine.clone()
        check(hvd.broadcast_(t, root) is t, "broadcast_ returns its tensor")
        same(t, want, "broadcast_")
        t = mine.clone()
        hvd.synchronize(hvd.broadcast_async_(t, root))
        same(t, want, "broadcast_async_")
        same(hvd.synchronize(hvd.broadcast_async(mine, root)), want, "broadcast_async")
    check(hvd.broadcast_object({"r": r}, root_rank=n - 1) == {"r": n - 1}, "broadcast_object")


def alltoall_checks(n: int, r: int) -> None:
    for dtype, dim in itertools.product([*DTYPES, torch.bool], DIMS):
        def tens(k: int, rows: int, dtype: torch.dtype = dtype, dim: int = dim) -> torch.Tensor:
            v = value(k, torch.int32 if dtype == torch.bool else dtype, dim, rows=rows)
            return v > 0 if dtype == torch.bool else v

        # splits[k] = rows rank r sends to rank k: (r + k) % 3
        def splits(k: int) -> list[int]:
            return [(k + j) % 3 for j in range(n)]

        mine = tens(r, sum(splits(r)))
        out, recv = hvd.alltoall(mine, splits=torch.tensor(splits(r), dtype=torch.int32))
        pieces = []
        for k in range(n):
            start = sum(splits(k)[:r])
            pieces.append(tens(k, sum(splits(k)))[start:start + splits(k)[r]])
        same(out, torch.cat(pieces), f"alltoall splits {dtype} {dim}d")
        same(recv, torch.tensor([splits(k)[r] for k in range(n)], dtype=torch.int32),
             "received splits")
        even = tens(r, 2 * n)
        out = hvd.alltoall(even)
        want = torch.cat([tens(k, 2 * n)[2 * r:2 * r + 2] for k in range(n)])
        same(out, want, f"alltoall even {dtype} {dim}d")
        if dim != 2:
            continue
        o2, rs = hvd.synchronize(hvd.alltoall_async(even))
        same(o2, want, "alltoall_async")
        same(rs, torch.full((n,), 2, dtype=torch.int32), "alltoall_async splits")
    out, recv = hvd.alltoall(torch.zeros(n, 1), splits=[1] * n)
    same(recv, torch.ones(n, dtype=torch.int32), "list splits give int32 received splits")


def reducescatter_checks(n: int, r: int) -> None:
    rows = 2 * n + 1  # uneven: the first rank gets one row more
    counts = [rows // n + (1 if k < rows % n else 0) for k in range(n)]
    lo = sum(counts[:r])
    for dtype, dim, op in itertools.product(DTYPES, DIMS, [hvd.Average, hvd.Sum]):
        mine = value(r, dtype, dim, rows=rows)
        full = reduce_ref([value(k, dtype, dim, rows=rows) for k in range(n)], op)
        want = full[lo:lo + counts[r]]
        same(hvd.reducescatter(mine, op=op), want, f"reducescatter {dtype} {dim}d op{op}")
        if dim != 2:
            continue
        same(hvd.synchronize(hvd.reducescatter_async(mine, op=op)), want, "reducescatter_async")
        g = hvd.grouped_reducescatter([mine, mine], op=op)
        same(g[1], want, "grouped_reducescatter")
        g = hvd.synchronize(hvd.grouped_reducescatter_async([mine], op=op))
        same(g[0], want, "grouped_reducescatter_async")
    x = torch.ones(rows)
    same(hvd.reducescatter(x, op=hvd.Sum, prescale_factor=3.0, postscale_factor=0.5),
         torch.full((counts[r],), 1.5 * n), "reducescatter scale factors")


def grouped_allreduce_checks(n: int, r: int) -> None:
    ts = [value(r, d, dim) for d, dim in zip(DTYPES, itertools.cycle(DIMS), strict=False)]
    wants = [reduce_ref([value(k, t.dtype, t.dim()) for k in range(n)], hvd.Sum) for t in ts]
    for got, want in zip(hvd.grouped_allreduce(ts, op=hvd.Sum), wants, strict=True):
        same(got, want, "grouped_allreduce")
    for got, want in zip(hvd.synchronize(hvd.grouped_allreduce_async(ts, op=hvd.Sum)), wants,
                         strict=True):
        same(got, want, "grouped_allreduce_async")
    copies = [t.clone() for t in ts]
    outs = hvd.grouped_allreduce_(copies, op=hvd.Sum)
    for c, o, want in zip(copies, outs, wants, strict=True):
        check(c is o, "grouped_allreduce_ returns its tensors")
        same(c, want, "grouped_allreduce_")
    copies = [t.clone() for t in ts]
    hvd.synchronize(hvd.grouped_allreduce_async_(copies, op=hvd.Sum))
    for c, want in zip(copies, wants, strict=True):
        same(c, want, "grouped_allreduce_async_")


def gradient_checks(n: int, r: int) -> None:
    ps_sum = n * (n + 1) / 2
    for dim in DIMS:
        shape = [3] + [2] * (dim - 1)
        # allreduce: backward all-reduces the gradient with the same op
        x = torch.ones(shape, requires_grad=True)
        (hvd.allreduce(x, op=hvd.Sum) * (r + 1)).sum().backward()
        same(x.grad, torch.full(shape, ps_sum), f"allreduce Sum grad {dim}d")
        x = torch.ones(shape, requires_grad=True)
        (hvd.allreduce(x) * (r + 1)).sum().backward()
        same(x.grad, torch.full(shape, ps_sum / n), f"allreduce Average grad {dim}d")
        # allgather: gradient averaged, this rank's rows
        x = torch.ones([r + 1, *shape[1:]], requires_grad=True)
        g = hvd.allgather(x)
        w = torch.arange(g.shape[0], dtype=torch.float32).view(-1, *[1] * (dim - 1)) * (r + 1)
        (g * w).sum().backward()
        off = sum(k + 1 for k in range(r))
        rows = torch.arange(off, off + r + 1, dtype=torch.float32) * ps_sum / n
        same(x.grad, rows.view(-1, *[1] * (dim - 1)).expand_as(x), f"allgather grad {dim}d")
        # broadcast: gradient averaged on the root, zero elsewhere
        x = torch.ones(shape, requires_grad=True)
        (hvd.broadcast(x, root_rank=0) * (r + 1)).sum().backward()
        same(x.grad, torch.full(shape, ps_sum / n if r == 0 else 0.0), f"broadcast grad {dim}d")
        # alltoall: gradient goes back with the received splits
        x = torch.ones([n, *shape[1:]], requires_grad=True)
        out, _ = hvd.alltoall(x, splits=[1] * n)
        (out * (r + 1)).sum().backward()
        want = torch.tensor([k + 1.0 for k in range(n)]).view(-1, *[1] * (dim - 1))
        same(x.grad, want.expand_as(x), f"alltoall grad {dim}d")
        # reducescatter (Horovod's HorovodReducescatter.backward): the all-gather of the
        # gradients, times the set size for Sum, times the scale factors
        x = torch.ones([n, *shape[1:]], requires_grad=True)
        (hvd.reducescatter(x, op=hvd.Sum) * (r + 1)).sum().backward()
        same(x.grad, (want * n).expand_as(x), f"reducescatter Sum grad {dim}d")
        x = torch.ones([n, *shape[1:]], requires_grad=True)
        (hvd.reducescatter(x) * (r + 1)).sum().backward()
        same(x.grad, want.expand_as(x), f"reducescatter Average grad {dim}d")
        x = torch.ones([n, *shape[1:]], requires_grad=True)
        (hvd.reducescatter(x, op=hvd.Sum, prescale_factor=3.0, postscale_factor=0.5)
         * (r + 1)).sum().backward()
        same(x.grad, (want * n * 1.5).expand_as(x), f"reducescatter scaled grad {dim}d")
    # grouped variants
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    ga, gb = hvd.grouped_allreduce([a, b], op=hvd.Sum)
    ((ga + gb.sum()) * (r + 1)).sum().backward()
    same(a.grad, torch.full((2,), ps_sum), "grouped_allreduce grad")
    same(b.grad, torch.full((3,), 2 * ps_sum), "grouped_allreduce grad 2")
    a = torch.ones(1, requires_grad=True)
    (hvd.grouped_allgather([a])[0] * (r + 1)).sum().backward()
    same(a.grad, torch.full((1,), ps_sum / n), "grouped_allgather grad")
    for op, factor in ((hvd.Sum, n), (hvd.Average, 1)):
        a = torch.ones(n, requires_grad=True)
        (hvd.grouped_reducescatter([a], op=op)[0] * (r + 1)).sum().backward()
        same(a.grad, torch.arange(1.0, n + 1) * factor, f"grouped_reducescatter grad op{op}")


def misc_checks(n: int, r: int) -> None:
    i = torch.tensor([[r], [0]])
    v = torch.tensor([float(r + 1)])
    sp = torch.sparse_coo_tensor(i, v, (n, 2), check_invariants=True)
    out = hvd.synchronize(hvd.sparse_allreduce_async(sp, name="sp", op=hvd.Sum))
    same(out.to_dense(), torch.stack([torch.tensor([k + 1.0, 0.0]) for k in range(n)]),
         "sparse_allreduce_async")
    hvd.barrier()
    check(hvd.synchronize(12345678) is None, "unknown handles synchronize to None")
    check(hvd.mpi_built() and hvd.mpi_enabled() and not hvd.gloo_built(), "capabilities")
    check(not any([hvd.gloo_enabled(), hvd.nccl_built(), hvd.ddl_built(), hvd.ccl_built(),
                   hvd.cuda_built(), hvd.rocm_built()]), "capabilities 2")
    check(isinstance(hvd.mpi_threads_supported(), bool), "mpi_threads_supported")
    check(issubclass(hvd.HorovodInternalError, RuntimeError), "HorovodInternalError")
    # the timeline: mpitrain's merged Chrome trace, one span per Horovod collective
    path = hvd.broadcast_object(tempfile.mkdtemp() + "/hvd-trace.json", root_rank=0)
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(2), name="traced")
    hvd.synchronize(hvd.allgather_async(torch.ones(1), name="traced.gather"))
    hvd.stop_timeline()
    if r == 0:
        events = json.loads(Path(path).read_text())["traceEvents"]
        names = {(e.get("name"), e.get("pid")) for e in events}
        for k in range(n):
            check(("hvd.allreduce traced", k) in names, f"timeline span of rank {k}")
            check(("hvd.allgather traced.gather", k) in names, "timeline async span")
        Path(path).unlink()
    # hvd.elastic runs as an ordinary job (tests/mpi/scenarios/hvd_alias_elastic.py)
    check(callable(hvd.elastic.run) and hasattr(hvd.elastic, "TorchState"), "hvd.elastic")


def value_error(fn: object, what: str, needle: str = "") -> None:
    """``fn()`` raises ValueError (not HorovodInternalError) within a second."""
    t0 = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except hvd.HorovodInternalError as e:
        check(False, f"{what}: HorovodInternalError instead of ValueError: {e}")
    except ValueError as e:
        check(needle in str(e), f"{what}: {needle!r} not in {e}")
        check(time.monotonic() - t0 < 1.0, f"{what}: not raised at once")
        return
    check(False, f"{what}: no ValueError")


def client_semantics_checks(n: int, r: int) -> None:
    """Horovod client code unchanged: argument errors, names in flight, the optimizer."""
    # Horovod's InvalidArgument errors: a ValueError on the calling rank, nothing issued
    value_error(lambda: hvd.alltoall(torch.ones(n + 1)), "alltoall uneven", "splits")
    value_error(lambda: hvd.alltoall(torch.ones(n), splits=[n] * n), "splits sum", "splits")
    value_error(lambda: hvd.alltoall(torch.ones(n), splits=[1] * (n + 1)), "splits count")
    value_error(lambda: hvd.broadcast(torch.ones(1), root_rank=n), "root outside", "root")
    if r == 0:  # one rank alone: it raises and its peers are in no collective
        value_error(lambda: hvd.alltoall_async(torch.ones(n + 1)), "one rank", "splits")
        value_error(lambda: hvd.broadcast_(torch.ones(1), root_rank=-1), "one rank root")
    same(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(n)), "next op")
    # a name in flight: the second submission raises at once, on that rank alone
    h = hvd.allreduce_async(torch.ones(2), name="x")
    if r == 0:
        value_error(lambda: hvd.allreduce_async(torch.ones(2), name="x"), "in flight",
                    "same name")
    hvd.barrier()
    same(hvd.synchronize(h), torch.ones(2), "the first 'x' completes")
    # DistributedOptimizer without named_parameters (Horovod names them itself)
    model = torch.nn.Linear(2, 1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([{"params": [model.weight]},
                                                    {"params": [model.bias]}], lr=1.0))
    w0 = model.weight.detach().clone()
    model(torch.full((1, 2), float(r + 1))).sum().backward()
    opt.step()
    mean = (n + 1) / 2
    same(model.weight.detach(), w0 - mean, "unnamed parameters are averaged")
    # step() after an explicit synchronize() without skip_synchronize() warns (as Horovod)
    for skip in (False, True):
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        opt.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if skip:
                with opt.skip_synchronize():
                    opt.step()
            else:
                opt.step()
        text = [str(w.message) for w in seen]
        check(any("skip_synchronize" in m for m in text) != skip, f"warning {skip}: {text}")


def sparse_optimizer_checks(n: int, r: int) -> None:
    """``nn.Embedding(sparse=True)`` with ``SparseAdam``: rank r's gradient rows are exchanged
    (all-gathered, or densified with ``sparse_as_dense``); the result equals SparseAdam on the
    dense average of every rank's gradient, computed here by hand."""
    def loss(emb: torch.nn.Embedding, k: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 * k + step)
        ids = torch.tensor([k % 7, (3 * k + step) % 7, 5, 5])
        return (emb(ids) * torch.randn(4, 3, generator=g)).sum()

    for as_dense in (False, True):
        torch.manual_seed(0)
        emb, ref = torch.nn.Embedding(7, 3, sparse=True), torch.nn.Embedding(7, 3, sparse=True)
        ref.load_state_dict(emb.state_dict())
        opt = hvd.DistributedOptimizer(torch.optim.SparseAdam(emb.parameters(), lr=0.1),
                                       named_parameters=emb.named_parameters(),
                                       sparse_as_dense=as_dense)
        ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            loss(emb, r, step).backward()
            grad = emb.weight.grad
            check(grad is not None and grad.is_sparse, "the gradient stays sparse")
            opt.step()
            dense = torch.zeros(7, 3)
            for k in range(n):
                ref.zero_grad()
                loss(ref, k, step).backward()
                assert ref.weight.grad is not None
                dense += ref.weight.grad.to_dense()
            ref.weight.grad = (dense / n).to_sparse(1)
            ref_opt.step()
        same(emb.weight.detach(), ref.weight.detach(), f"SparseAdam, sparse_as_dense={as_dense}")


GROUPS = (allreduce_checks, allgather_checks, broadcast_checks, alltoall_checks,
          reducescatter_checks, grouped_allreduce_checks, gradient_checks, misc_checks,
          client_semantics_checks, sparse_optimizer_checks)


def run_groups(n: int, r: int) -> None:
    """Run every group; rank 0 prints a PASS line per group."""
    for group in GROUPS:
        COUNT["n"] = 0
        t0 = time.perf_counter()
        group(n, r)
        if r == 0:
            dt = time.perf_counter() - t0
            print(f"PASS {group.__name__} ({COUNT['n']} checks, {dt:.2f} s)", flush=True)


def main(comm: object) -> int:
    """Run every group of checks (hvd.init() on COMM_WORLD)."""
    torch.set_num_threads(1)
    hvd.init()
    run_groups(hvd.size(), hvd.rank())
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
