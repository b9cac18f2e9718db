"""The GPT split by tensor and pipeline parallelism == the dense GPT (losses and gradients).

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/model_parallel.py  (also -n 4)
Prints one "PASS <check>" line per check on rank 0; any failure raises (non-zero exit).
Tolerance: float32, rtol 1e-5 / atol 1e-6 on losses and gradients (sums in another order).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn
from torch.nn import functional as F

from mpitrain.checkpoint.reshard import merge_parallel
from mpitrain.grad.parallel import DataParallel
from mpitrain.parallel.chunks import StageChunks
from mpitrain.parallel.convert import parallelize_
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import PipelineEngine
from mpitrain.parallel.schedule import peak_in_flight
from mpitrain.runtime.abort import run_mpi
from mpitrain.train.gpt import GPTConfig, GPTStage

TOL = {"rtol": 1e-5, "atol": 1e-6}
B, M = 8, 4  # batch, micro-batches


def batch(c: GPTConfig, seed: int = 1, n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, c.vocab, (n, c.context + 1), generator=g)
    return w[:, :-1], w[:, 1:]


def dense_grads(
    c: GPTConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    model = GPTStage(c, MPI.COMM_SELF)
    loss = torch.stack([model(a, b) for a, b in zip(x.chunk(M), y.chunk(M), strict=True)]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def gathered_grads(stage: GPTStage | StageChunks, grid: Grid) -> dict[str, torch.Tensor] | None:
    """Collective: the dense gradient dict on world rank 0 (other ranks None); a rank's
    chunks (virtual stages) name their parameters as the dense GPT does."""
    parts: list[GPTStage] = list(stage) if isinstance(stage, StageChunks) else [stage]
    grads = {n: p.grad.clone() for part in parts for n, p in part.named_parameters()}
    table = {k: v for part in parts for k, v in part.merge_rules().items()}
    every = grid.comm.gather((grid.pp_rank, grid.tp_rank, grid.dp_rank, grads, table), root=0)
    if every is None:
        return None
    stages: list[list[dict[str, torch.Tensor]]] = [
        [{} for _ in range(grid.tensor)] for _ in range(grid.pipeline)]
    tables: list[dict[str, list[object]]] = [{} for _ in range(grid.pipeline)]
    for pp, tp, dp, g, t in every:
        if dp == 0:
            stages[pp][tp], tables[pp] = g, t
    return merge_parallel(tables, stages)


def check_split(
    world: MPI.Intracomm, name: str, tensor: int, pipeline: int, schedule: str, sp: bool = False,
    ac: str = "none",
) -> None:
    """The split GPT (its blocks under activation checkpointing ``ac``) == the dense GPT."""
    c = GPTConfig(context=16, dim=32, heads=4, layers=4, sequence_parallel=sp, seed=3,
                  activation_checkpointing=ac)
    grid = Grid.create(world, tensor=tensor, pipeline=pipeline)
    stage = GPTStage(c, grid.tp_comm, grid.pp_rank, grid.pipeline)
    dp = DataParallel(stage, comm=grid.dp_comm) if grid.data > 1 else None
    eng = PipelineEngine(stage, grid, micro_batches=M, schedule=schedule, data_parallel=dp,
                         tied=stage.tied_parameters(),
                         sequence_parallel_params=stage.sequence_parallel_parameters())
    # data parallel: each replica its own half of a 2B batch; the dense reference sees all
    x, y = batch(c, n=B * grid.data)
    xs, ys = x.chunk(grid.data)[grid.dp_rank], y.chunk(grid.data)[grid.dp_rank]
    loss = eng.train_step(xs, ys)
    losses = grid.dp_comm.allgather(loss)
    got = gathered_grads(stage, grid)
    if world.rank == 0:
        assert got is not None
        # the reference: mean over replicas of mean over micro-batches
        ref_losses, ref = [], {}
        for r in range(grid.data):
            lr, gr = dense_grads(replace(c, activation_checkpointing="none"),
                                 x.chunk(grid.data)[r], y.chunk(grid.data)[r])
            ref_losses.append(lr)
            for k, v in gr.items():
                ref[k] = ref.get(k, 0) + v / grid.data
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
        assert set(got) == set(ref), (set(got) ^ set(ref))
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    peaks = world.gather((grid.pp_rank, eng.stats.peak_in_flight), root=0)
    if world.rank == 0:
        assert peaks is not None
        for pp, peak in peaks:
            want = M if schedule == "gpipe" else min(M, grid.pipeline - pp)
            assert peak == want, (pp, peak, want)
        print(f"PASS {name}", flush=True)
    grid.free()


class StdBlock(nn.Module):
    """A plain pre-LN transformer block from nn.Linear layers (what users write)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.ln1(x)
        q, k, v = (m(a).view(b, t, self.heads, -1).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # type: ignore[no-any-return]


class FusedBlock(nn.Module):
    """Attention with one fused [q; k; v] input projection."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))  # type: ignore[no-any-return]


def check_parallelize(world: MPI.Intracomm) -> None:
    """parallelize_ turns a standard block tensor-parallel, equal to the dense one."""
    import copy

    grid = Grid.create(world, tensor=world.size)
    torch.manual_seed(0)
    dense = StdBlock()
    split = parallelize_(copy.deepcopy(dense), {"q": "column", "k": "column", "v": "column",
                                                 "o": "row", "fc1": "column", "fc2": "row"},
                         grid.tp_comm)
    split.heads //= world.size  # type: ignore[operator]
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_s, out_d = split(xs), dense(xd)
    (out_s * out_d.detach()).sum().backward()
    (out_d * out_d.detach()).sum().backward()
    torch.testing.assert_close(out_s, out_d, **TOL)
    torch.testing.assert_close(xs.grad, xd.grad, **TOL)
    r, n = grid.tp_rank, world.size
    torch.testing.assert_close(split.fc1.weight.grad, dense.fc1.weight.grad.chunk(n)[r], **TOL)
    torch.testing.assert_close(split.o.weight.grad, dense.o.weight.grad.chunk(n, 1)[r], **TOL)
    torch.testing.assert_close(split.ln1.weight.grad, dense.ln1.weight.grad, **TOL)
    # a fused [q; k; v] projection (GPT-2's c_attn): one column layer, heads kept together
    torch.manual_seed(2)
    fused_dense = FusedBlock()
    fused = parallelize_(copy.deepcopy(fused_dense), {"qkv": "column-qkv", "o": "row"},
                         grid.tp_comm)
    fused.heads //= world.size  # type: ignore[operator]
    xf, xg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_f, out_g = fused(xf), fused_dense(xg)
    (out_f * out_g.detach()).sum().backward()
    (out_g * out_g.detach()).sum().backward()
    torch.testing.assert_close(out_f, out_g, **TOL)
    torch.testing.assert_close(xf.grad, xg.grad, **TOL)
    # padding tokens (ignore_index) count for nothing, as in F.cross_entropy
    from mpitrain.parallel.tensor import vocab_parallel_cross_entropy

    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    target = torch.tensor([1, -100, 5, 15, -100, 8])
    dense_loss = F.cross_entropy(logits, target, reduction="none")
    dense_loss.sum().backward()
    mine = logits.detach().chunk(n, -1)[r].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(mine, target, grid.tp_comm, r * 16 // n)
    loss.sum().backward()
    torch.testing.assert_close(loss, dense_loss.detach(), **TOL)
    assert logits.grad is not None
    torch.testing.assert_close(mine.grad, logits.grad.chunk(n, -1)[r], **TOL)
    try:
        parallelize_(StdBlock(), {"nope": "column"}, grid.tp_comm)
    except ValueError as exc:
        assert "matches no module" in str(exc), exc
    else:
        raise AssertionError("a bad plan path was accepted")
    if world.rank == 0:
        print(f"PASS parallelize a standard block {n}", flush=True)
    grid.free()


def check_fp16_overflow_agreed(world: MPI.Intracomm) -> None:
    """fp16 loss scaling on a tensor x pipeline grid: an inf in one tensor rank's gradients
    only makes every rank's scaler skip the step and back off alike (parameters unchanged)."""
    from mpitrain.train.grid import GridExchange, PipelineSteps

    n = world.size
    tensor, pipeline = (2, 2) if n == 4 else (n, 1)
    grid = Grid.create(world, tensor=tensor, pipeline=pipeline)
    c = GPTConfig(context=8, dim=16, heads=2, layers=2)
    stage = GPTStage(c, grid.tp_comm, grid.pp_rank, grid.pipeline)
    engine = PipelineEngine(stage, grid, micro_batches=2, tied=stage.tied_parameters())
    exchange = GridExchange(stage, engine, {})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    steps = PipelineSteps(engine, torch.device("cpu"), "fp32", scaler)
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)
    before = [p.detach().clone() for p in stage.parameters()]
    x, y = batch(c, n=4)

    class _B:
        def __init__(self) -> None:
            self.x, self.mask = torch.cat([x, y[:, -1:]], dim=1), torch.ones(4)

    steps.forward_backward([_B()])  # type: ignore[list-item]
    if grid.tp_rank == 1 and grid.pp_rank == 0:  # one tensor rank of one stage overflows
        next(p for p in stage.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    exchange.unscale_(opt, scaler)
    exchange.scaled_step(opt, scaler)
    scales = world.allgather(float(scaler.get_scale()))
    assert scales == [512.0] * n, scales  # every rank backed off (without: 1024 on most)
    for a, b in zip(before, stage.parameters(), strict=True):
        assert torch.equal(a, b.detach()), "a rank stepped"
    grid.free()
    if world.rank == 0:
        print(f"PASS fp16 overflow on one tensor rank skips every rank {n}", flush=True)


def check_zero3_checkpointing(world: MPI.Intracomm) -> None:
    """ZeRO-3 over the replicas (tensor 2 on 4 ranks): 2 SGD steps with the blocks (ZeRO-3's
    gather units) under full and selective activation checkpointing == without, bitwise."""
    from mpitrain.grad.zero.wrapper import ShardedDataParallel

    tensor = 2 if world.size == 4 else 1
    runs = []
    for ac in ("none", "full", "selective"):
        c = GPTConfig(context=16, dim=32, heads=4, layers=3, seed=3, activation_checkpointing=ac)
        grid = Grid.create(world, tensor=tensor, pipeline=1)
        stage = GPTStage(c, grid.tp_comm)
        sdp = ShardedDataParallel(stage, comm=grid.dp_comm, stage=3, units=stage.zero3_units())
        eng = PipelineEngine(stage, grid, micro_batches=2, data_parallel=sdp,
                             eval_through_exchange=True)
        opt = torch.optim.SGD(sdp.parameters(), lr=0.5)
        losses = []
        for seed in (1, 2):
            x, y = batch(c, seed, n=4 * grid.data)
            losses.append(eng.train_step(x.chunk(grid.data)[grid.dp_rank],
                                         y.chunk(grid.data)[grid.dp_rank]))
            sdp.step(opt)
            sdp.zero_grad()
        losses.append(eng.eval_step(x, y))
        assert sdp.sharded is not None
        with sdp.sharded.gathered():
            runs.append((losses, [p.detach().clone() for p in stage.parameters()]))
        sdp.close()
        grid.free()
    (l0, p0), *others = runs
    for l1, p1 in others:
        assert l0 == l1, (l0, l1)
        assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    name = f"{'tensor 2 x ' if tensor > 1 else ''}ZeRO-3 x data {world.size // tensor} " \
        "activation checkpointing"
    if world.rank == 0:
        print(f"PASS {name}", flush=True)


def check_thread_sends(world: MPI.Intracomm) -> None:
    """The pipeline's sends on a communication thread (``progress="thread"``) give the same
    losses and gradients as ``Isend``, bit for bit, over three steps of both schedules."""
    c = GPTConfig(context=16, dim=32, heads=4, layers=4, seed=3)
    for schedule in ("gpipe", "1f1b"):
        out = []
        for progress in ("poll", "thread"):
            grid = Grid.create(world, tensor=1, pipeline=world.size)
            stage = GPTStage(c, grid.tp_comm, grid.pp_rank, grid.pipeline)
            eng = PipelineEngine(stage, grid, micro_batches=M, schedule=schedule,
                                 tied=stage.tied_parameters(), progress=progress)
            losses = []
            for s in range(3):
                x, y = batch(c, seed=1 + s)
                losses.append(eng.train_step(x, y))
                grads = [p.grad.clone() for p in stage.parameters() if p.grad is not None]
                stage.zero_grad()
            assert (eng.thread is not None) == (progress == "thread")
            eng.close()
            grid.free()
            out.append((losses, grads))
        (l0, g0), (l1, g1) = out
        assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True)), schedule
    if world.rank == 0:
        print(f"PASS pipeline {world.size} sends on a thread", flush=True)


def check_interleaved(world: MPI.Intracomm, name: str, tensor: int, pipeline: int,
                      sp: bool = False, progress: tuple[str, ...] = ("poll",)) -> None:
    """Two chunks per rank (chunk c = global stage c * P + s of 2P), the interleaved schedule:
    loss, gradients and evaluation loss == the dense GPT (with replicas: each its half);
    with ``progress`` poll and thread, the same bit for bit."""
    v, runs = 2, []
    for prog in progress:
        c = GPTConfig(context=16, dim=32, heads=4, layers=v * pipeline, sequence_parallel=sp,
                      seed=3)
        grid = Grid.create(world, tensor=tensor, pipeline=pipeline)
        chunks = StageChunks(GPTStage(c, grid.tp_comm, k * grid.pipeline + grid.pp_rank,
                                      v * grid.pipeline) for k in range(v))
        dp = DataParallel(chunks, comm=grid.dp_comm) if grid.data > 1 else None
        eng = PipelineEngine(chunks, grid, micro_batches=M, schedule="interleaved",
                             data_parallel=dp, tied=chunks.tied_parameters(),
                             sequence_parallel_params=chunks.sequence_parallel_parameters(),
                             progress=prog)
        x, y = batch(c, n=B * grid.data)
        xs, ys = x.chunk(grid.data)[grid.dp_rank], y.chunk(grid.data)[grid.dp_rank]
        losses = grid.dp_comm.allgather(eng.train_step(xs, ys))
        got = gathered_grads(chunks, grid)
        assert eng.stats.peak_in_flight == peak_in_flight(eng.actions)
        ev = eng.eval_step(x[: B - 2], y[: B - 2])  # 6 samples: micro-batches of 2, 2, 2
        runs.append((losses, got))
        if world.rank == 0:
            assert got is not None
            ref_losses, ref = [], {}
            for r in range(grid.data):
                lr, gr = dense_grads(c, x.chunk(grid.data)[r], y.chunk(grid.data)[r])
                ref_losses.append(lr)
                for k, g in gr.items():
                    ref[k] = ref.get(k, 0) + g / grid.data
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
            assert set(got) == set(ref), (set(got) ^ set(ref))
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
            with torch.no_grad():
                dense = GPTStage(c, MPI.COMM_SELF)
                want = float(dense(x[: B - 2], y[: B - 2]))
            torch.testing.assert_close(torch.tensor(ev), torch.tensor(want), **TOL)
        eng.close()
        grid.free()
    if world.rank == 0:
        (l0, g0), *others = runs
        for l1, g1 in others:
            assert l0 == l1 and g0 is not None and g1 is not None
            assert all(torch.equal(g0[k], g1[k]) for k in g0), "thread != poll"
        print(f"PASS {name}", flush=True)


def main(world: MPI.Intracomm) -> int:
    n = world.size
    check_parallelize(world)
    check_split(world, f"pipeline {n} gpipe", 1, n, "gpipe")
    check_split(world, f"pipeline {n} 1f1b", 1, n, "1f1b")
    check_split(world, f"tensor {n}", n, 1, "1f1b")
    check_split(world, f"tensor {n} sequence parallel", n, 1, "1f1b", sp=True)
    if n == 4:
        check_split(world, "tensor 2 x data 2", 2, 1, "1f1b")
        check_split(world, "pipeline 2 x data 2", 1, 2, "1f1b")
        check_split(world, "tensor 2 x pipeline 2", 2, 2, "1f1b")
    if n == 2:  # activation checkpointing (4 ranks: tensor 2 with ZeRO-3 below)
        check_split(world, "tensor 2 sequence parallel activation checkpointing full", 2, 1,
                    "1f1b", sp=True, ac="full")
        check_split(world, "tensor 2 activation checkpointing selective", 2, 1, "1f1b",
                    ac="selective")
        check_split(world, "pipeline 2 activation checkpointing full", 1, 2, "1f1b", ac="full")
    check_zero3_checkpointing(world)
    check_interleaved(world, f"pipeline {n} interleaved", 1, n, progress=("poll", "thread"))
    if n == 4:
        check_interleaved(world, "pipeline 2 x data 2 interleaved", 1, 2)
        check_interleaved(world, "tensor 2 x pipeline 2 interleaved sequence parallel", 2, 2,
                          sp=True)
    check_fp16_overflow_agreed(world)
    check_thread_sends(world)
    assert peak_in_flight([]) == 0
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
