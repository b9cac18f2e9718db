"""ZeRO stages 1 and 2 == unsharded sync DataParallel on the same data (and memory ~ 1/N).

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/zero_equivalence.py
Prints one "PASS <check>" line per check on rank 0; any failure raises (non-zero exit).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.errors import CommError
from mpitrain.grad.zero import ShardedDataParallel
from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.world import World
from tests.mpi.scenarios.orders import OtherOrderReducer

STEPS = 3
B = 8  # per-rank batch
D_IN, D_OUT = 13, 5  # odd sizes: buckets do not divide by the number of ranks

Opt = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Opt] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
}


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D_IN, 31)
        self.b = nn.Linear(31, 29)
        self.c = nn.Linear(29, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Deep(nn.Module):
    """Six equal units: stage 3 gathers one (and prefetches the next) at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D_IN if i == 0 else 32, 32) for i in range(5))
        self.out = nn.Linear(32, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)  # type: ignore[no-any-return]


class Branchy(nn.Module):
    """``extra`` is used only on rank 0; ``never`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D_IN, 17)
        self.extra = nn.Linear(17, 17)
        self.never = nn.Linear(17, 3)
        self.c = nn.Linear(17, D_OUT)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.c(h)


class DeepBranchy(nn.Module):
    """Eight units; unit 6 runs on rank 0 only (set in ``make``). With at most 2 reduce-scatters
    in flight, a rank that waited for the oldest inside a backward hook would never post the
    gather of unit 2 the other rank needs: ZeRO-3 must not block there."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.out = nn.Linear(16, D_OUT)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for i, layer in enumerate(self.layers):
            if i != 5 or self.use_extra:
                h = torch.tanh(layer(h))
        return self.out(h)  # type: ignore[no-any-return]


class Alternating(Branchy):
    """``extra`` is used in every other forward: the first micro-batch of two, not the last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        self.use_extra = self.calls % 2 == 1
        return super().forward(x)


class Bn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no bias in front of BatchNorm: its true gradient is 0, and Adam would turn the
        # rounding noise of its sum (sign set by the summation order) into steps of +-lr
        self.a = nn.Linear(D_IN, 15, bias=False)
        self.bn = nn.BatchNorm1d(15)
        self.c = nn.Linear(15, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.bn(self.a(x))))


def my_chunk(comm: MPI.Intracomm, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS * comm.size * B, D_IN, generator=g)
    y = torch.randn(STEPS * comm.size * B, D_OUT, generator=g)
    lo = (s * comm.size + comm.rank) * B
    return x[lo : lo + B], y[lo : lo + B]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def make(cls: type[nn.Module], comm: MPI.Intracomm) -> nn.Module:
    torch.manual_seed(100 + comm.rank)  # different init per rank: wrapping must broadcast
    m = cls()
    if isinstance(m, Branchy | DeepBranchy):
        m.use_extra = comm.rank == 0
    return m


def train(comm: MPI.Intracomm, cls: type[nn.Module], opt_name: str, stage: int, *,
          micro: int = 1, clip: float | None = None, bucket_mb: float = 0.001,
          compression: str = "none", sdp: dict[str, object] | None = None,
          world: World | None = None, other_order: bool = False,
          ) -> tuple[nn.Module, nn.Module | ShardedDataParallel, torch.optim.Optimizer]:
    """Train ``stage`` (0 = DataParallel) for STEPS steps; return (module, wrapper, opt)."""
    model: DataParallel | ShardedDataParallel
    if stage == 0:
        model = DataParallel(make(cls, comm), comm=comm, bucket_mb=bucket_mb,
                             hook=None if compression == "none" else compression,
                             reducer=OtherOrderReducer(comm) if other_order else None)
        opt = OPTIMIZERS[opt_name](list(model.module.parameters()))
    else:
        model = ShardedDataParallel(make(cls, comm), comm=comm, stage=stage,
                                    bucket_mb=bucket_mb, compression=compression,
                                    world=world, **(sdp or {}))  # type: ignore[arg-type]
        opt = OPTIMIZERS[opt_name](list(model.parameters()))
    for s in range(STEPS):
        x, y = my_chunk(comm, s)
        m = B // micro
        for i in range(micro):
            ctx = model.no_sync() if i < micro - 1 else contextlib.nullcontext()
            with ctx:
                (mse(model(x[i * m : (i + 1) * m]), y[i * m : (i + 1) * m]) / micro).backward()
        model.synchronize()
        if isinstance(model, ShardedDataParallel):
            if clip is not None:
                model.clip_grad_norm_(clip)
            model.step(opt)
            model.zero_grad()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.module.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return model.module, model, opt


def check_close(comm: MPI.Intracomm, name: str, got: nn.Module, want: nn.Module,
                wrapper: object = None, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if isinstance(wrapper, ShardedDataParallel):  # stage 3: gather the shards to compare
        with wrapper.gathered():
            check_close(comm, name, got, want, None, rtol, atol)
        return
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                       msg=lambda m, k=k: f"{name} {k}: {m}")
        else:
            assert torch.equal(a, b), (name, k, a, b)
    flat = torch.cat([t.detach().double().reshape(-1) for t in got.state_dict().values()])
    ref = flat.clone()
    comm.Bcast(ref.numpy(), root=0)
    assert torch.equal(flat, ref), f"{name}: ranks differ"


def passed(comm: MPI.Intracomm, name: str) -> None:
    if comm.rank == 0:
        print(f"PASS {name} (n={comm.size})", flush=True)


def equivalence(comm: MPI.Intracomm, name: str, cls: type[nn.Module], *,
                tol: tuple[float, float] = (1e-5, 1e-6), optimizers: tuple[str, ...] = (),
                **kw: object) -> None:
    for opt_name in optimizers or tuple(OPTIMIZERS):
        want, _, _ = train(comm, cls, opt_name, 0, **kw)  # type: ignore[arg-type]
        # the tolerance must hold for another summation order, or the test compares noise
        other, _, _ = train(comm, cls, opt_name, 0, other_order=True, **kw)  # type: ignore[arg-type]
        check_close(comm, f"{name} {opt_name}: reference summed in another order", other,
                    want, None, *tol)
        for stage in (1, 2, 3):
            got, w, _ = train(comm, cls, opt_name, stage, **kw)  # type: ignore[arg-type]
            check_close(comm, f"{name} stage {stage} {opt_name}", got, want,
                        w if stage == 3 else None, *tol)
    passed(comm, name)


def check_memory(comm: MPI.Intracomm) -> None:
    """Bytes per rank from the tensors themselves: the sharded parts ~ 1/N of a replica's."""
    n = comm.size
    _, dp, dp_opt = train(comm, Mlp, "adam", 0, bucket_mb=64)
    numel = sum(p.numel() for p in dp.module.parameters())
    replica_opt = sum(v.numel() * v.element_size() for st in dp_opt.state.values()
                      for v in st.values() if isinstance(v, torch.Tensor))
    assert replica_opt >= 8 * numel
    for stage in (1, 2):
        _, sdp, opt = train(comm, Mlp, "adam", stage, bucket_mb=64)
        assert isinstance(sdp, ShardedDataParallel)
        mem = sdp.memory_bytes(opt)
        pad = sdp.layout.total - numel  # the last bucket's padding only
        assert pad < n
        # optimizer state: two moments of the shard (+ one step scalar per bucket)
        assert mem["optimizer"] <= replica_opt / n + 8 * pad + 16 * len(sdp.layout.buckets), mem
        assert mem["optimizer"] >= 8 * numel / n, mem
        if stage == 2:
            assert mem["gradients"] == 4 * sdp.layout.shard_numel() <= 4 * (numel / n + pad), mem
        else:
            assert mem["gradients"] == 4 * sdp.layout.total, mem
        assert mem["parameters"] == 4 * sdp.layout.total
        # the shard Parameters are views of the full parameter buffer (no extra copy)
        base = sdp.full_params.data_ptr()
        for s in sdp.shards:
            assert base <= s.data_ptr() < base + sdp.full_params.numel() * 4
        if comm.rank == 0:
            print(f"MEMORY stage {stage} n={n} numel={numel} replica_opt={replica_opt} "
                  f"{mem}", flush=True)
    # stage 3: the shards persist; a unit's full parameters only while it is gathered
    _, sdp, opt = train(comm, Deep, "adam", 3)
    assert isinstance(sdp, ShardedDataParallel) and sdp.sharded is not None
    mem = sdp.memory_bytes(opt)
    numel = sum(p.numel() for p in sdp.module.parameters())
    unit = max(b.padded(n) for b in sdp.layout.buckets) * 4
    assert len(sdp.layout.buckets) == 6  # one per Linear
    assert sum(s.numel() for s in sdp.shards) == sdp.layout.shard_numel()
    # persistent: 1/N of the parameters (+ padding); transient: the unit in use + the prefetched
    assert mem["parameters"] == 4 * sdp.layout.shard_numel() <= 4 * numel / n + 4 * 6, mem
    assert 0 < mem["parameters_transient_peak"] <= 2 * unit, (mem, unit)
    assert mem["gradients"] == 4 * sdp.layout.shard_numel()
    assert sdp.sharded.live_bytes == 0  # nothing gathered between steps
    if comm.rank == 0:
        print(f"MEMORY stage 3 n={n} numel={numel} unit={unit} {mem}", flush=True)
    # stage 2 with many small buckets: at most max_inflight full bucket buffers alive at once
    _, sdp, _ = train(comm, Mlp, "adam", 2, bucket_mb=0.001)
    assert isinstance(sdp, ShardedDataParallel)
    biggest = max(b.padded(n) for b in sdp.layout.buckets) * 4
    assert len(sdp.layout.buckets) > 4
    assert 0 < sdp.grads.peak_transient <= sdp.grads.max_inflight * biggest, (
        sdp.grads.peak_transient, biggest)
    passed(comm, "memory accounting")


def masters(comm: MPI.Intracomm, sdp: ShardedDataParallel) -> dict[str, torch.Tensor]:
    """Collective: the float32 master parameters, joined from every rank's shards."""
    lay = sdp.layout
    chunks = comm.allgather([s.detach().clone() for s in sdp.shards])
    flats = [torch.cat([c[b] for c in chunks]) for b in range(len(lay.buckets))]
    out = {}
    for slot in lay.slots:
        (b,) = slot.buckets
        a = slot.offset - lay.buckets[b].offset
        out[slot.name] = flats[b][a : a + slot.numel].view(slot.shape)
    return out


def check_mixed_precision(comm: MPI.Intracomm) -> None:
    """Stage 3 with bf16 parameters: compute in bf16, float32 master shards stepped by SGD,
    equal to doing exactly that by hand (a bf16 copy of a float32 master per step)."""
    import copy

    torch.manual_seed(7)
    base = Mlp()
    master = copy.deepcopy(base)
    sdp = ShardedDataParallel(copy.deepcopy(base), comm=comm, stage=3, bucket_mb=0.001,
                              param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sdp.module.parameters())
    assert all(s.dtype == torch.float32 for s in sdp.shards)
    opt = torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(master.parameters(), lr=0.1, momentum=0.9)
    for s in range(STEPS):
        x, y = my_chunk(comm, s)
        out = sdp(x)
        assert out.dtype == torch.float32  # the root casts floating outputs back
        mse(out, y).backward()
        sdp.synchronize()
        sdp.step(opt)
        sdp.zero_grad()
        work = copy.deepcopy(master).to(torch.bfloat16)
        mse(work(x.to(torch.bfloat16)).float(), y).backward()
        for pm, pw in zip(master.parameters(), work.parameters(), strict=True):
            assert pw.grad is not None
            g = pw.grad.float()
            comm.Allreduce(MPI.IN_PLACE, g.numpy())
            pm.grad = g / comm.size
        ref_opt.step()
        ref_opt.zero_grad()
    got = masters(comm, sdp)
    for name, p in master.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=name: f"mixed precision {k}: {m}")
    mem = sdp.memory_bytes(opt)
    assert mem["parameters"] == 4 * sdp.layout.shard_numel()  # the float32 masters
    passed(comm, "mixed precision: bf16 compute, float32 master shards")


def check_misuse(comm: MPI.Intracomm) -> None:
    model = ShardedDataParallel(make(Mlp, comm), comm=comm, stage=2, bucket_mb=64)
    x, y = my_chunk(comm, 0)
    mse(model(x), y).backward()
    try:
        mse(model(x), y).backward()
    except CommError as exc:
        assert "computed twice" in str(exc) and "HINT" in str(exc), exc
    else:
        raise AssertionError("second backward before synchronize() was accepted")
    passed(comm, "second backward without no_sync raises")


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    equivalence(comm, "uneven sizes, many buckets", Mlp)
    equivalence(comm, "one bucket", Mlp, bucket_mb=64)
    equivalence(comm, "clipping", Mlp, clip=0.05)
    equivalence(comm, "no_sync accumulation", Mlp, micro=2)
    equivalence(comm, "unused branch", Branchy)
    equivalence(comm, "deep branch skipped on one rank", DeepBranchy)
    equivalence(comm, "branch used in an early micro-batch only", Alternating, micro=2)
    equivalence(comm, "batchnorm buffers", Bn)
    # the same bf16 sums as DataParallel's bf16 hook. 4 ranks may pair the sums differently:
    # one bf16 ulp in a near-zero gradient, which Adam's normalisation turns into a full lr
    # step, so there SGD only, at bf16's precision
    if comm.size == 2:
        equivalence(comm, "bf16 compression", Mlp, compression="bf16")
    else:
        equivalence(comm, "bf16 compression", Mlp, tol=(2e-2, 2e-3),
                    optimizers=("sgd-momentum",), compression="bf16")
    check_memory(comm)
    check_mixed_precision(comm)
    check_misuse(comm)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
