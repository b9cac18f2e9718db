"""Tensor-parallel layers == their dense counterparts: outputs, input and parameter gradients.

Run by hand: mpiexec -n 2 python tests/mpi/scenarios/tensor_parallel.py (or -n 4)
Prints one "PASS <check>" line per check on rank 0; any failure raises (non-zero exit).

The tensor group is the whole world (``Grid.create(comm, tensor=N)``). Every layer is built
from a generator with a fixed seed; the dense reference draws its full weights from the same
seed with the same init, written out here independently of mpitrain.parallel.
Tolerance: float32, rtol=1e-5 and atol=1e-6 -- the parallel sums only change the order of
the float additions (partial matmuls, all-reduces), never what is added.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn
from torch.nn import functional as F

from mpitrain.parallel import Grid
from mpitrain.parallel.functional import copy_to_tp, gather_from_tp, split_dim
from mpitrain.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    sequence_parallel_grads_,
    vocab_parallel_cross_entropy,
)
from mpitrain.runtime.abort import run_mpi

RTOL, ATOL = 1e-5, 1e-6
D_IN, HIDDEN, D_OUT = 6, 16, 5  # HIDDEN splits over 2 and 4 ranks; D_IN, D_OUT need not
B, S = 3, 8  # batch, sequence (S splits over 2 and 4 ranks)
VOCAB, DIM = 64, 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    """nn.Linear whose weight then bias are drawn like mpitrain's default_init from ``seed``."""
    g = gen(seed)
    lin = nn.Linear(d_in, d_out)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        lin.bias.uniform_(-bound, bound, generator=g)
    return lin


def dense_embedding(vocab: int, dim: int, seed: int) -> nn.Embedding:
    """nn.Embedding whose weight is N(0, 1) from ``seed`` (the parallel default)."""
    emb = nn.Embedding(vocab, dim)
    with torch.no_grad():
        emb.weight.normal_(0.0, 1.0, generator=gen(seed))
    return emb


def data(*shape: int, seed: int) -> torch.Tensor:
    """The same random tensor on every rank."""
    return torch.randn(*shape, generator=gen(seed))


def chunk(t: torch.Tensor, comm: MPI.Intracomm, dim: int) -> torch.Tensor:
    return t.chunk(comm.size, dim=dim)[comm.rank]


def close(name: str, what: str, got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    assert got is not None and want is not None, f"{name} {what}: missing ({got}, {want})"
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{name} {what}: {m}")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def passed(comm: MPI.Intracomm, name: str) -> None:
    comm.Barrier()  # every rank has checked before rank 0 reports
    if comm.rank == 0:
        print(f"PASS {name} (n={comm.size})", flush=True)


def check_column_split(tp: MPI.Intracomm) -> None:
    name = "column parallel, output split"
    col = ColumnParallelLinear(D_IN, HIDDEN, tp, generator=gen(1))
    ref = dense_linear(D_IN, HIDDEN, 1)
    x, r = data(B, D_IN, seed=10), data(B, HIDDEN, seed=11)
    xp, xd = leaf(x), leaf(x)
    y = col(xp)
    # each rank's loss covers its slice; their sum (the total) depends on all of the output
    (y * chunk(r, tp, -1)).sum().backward()
    yd = ref(xd)
    (yd * r).sum().backward()
    close(name, "output slice", y, chunk(yd, tp, -1))
    close(name, "input grad", xp.grad, xd.grad)
    close(name, "weight grad", col.weight.grad, chunk(ref.weight.grad, tp, 0))
    close(name, "bias grad", col.bias.grad, chunk(ref.bias.grad, tp, 0))
    # the same through gather_from_tp: one loss on the full output, equal on every rank
    col.zero_grad()
    xp = leaf(x)
    full = gather_from_tp(col(xp), tp)
    close(name, "gathered output", full, yd)
    (full * r).sum().backward()
    close(name, "input grad (gathered loss)", xp.grad, xd.grad)
    close(name, "weight grad (gathered loss)", col.weight.grad, chunk(ref.weight.grad, tp, 0))
    passed(tp, name)


def check_column_gathered(tp: MPI.Intracomm, x: torch.Tensor, name: str) -> None:
    col = ColumnParallelLinear(D_IN, HIDDEN, tp, gather_output=True, generator=gen(2))
    ref = dense_linear(D_IN, HIDDEN, 2)
    r = data(*x.shape[:-1], HIDDEN, seed=12)
    xp, xd = leaf(x), leaf(x)
    y, yd = col(xp), ref(xd)
    close(name, "column output", y, yd)
    (y * r).sum().backward()
    (yd * r).sum().backward()
    close(name, "column input grad", xp.grad, xd.grad)
    close(name, "column weight grad", col.weight.grad, chunk(ref.weight.grad, tp, 0))
    close(name, "column bias grad", col.bias.grad, chunk(ref.bias.grad, tp, 0))


def check_mlp(tp: MPI.Intracomm, x: torch.Tensor, name: str) -> None:
    """Column(gather_output=False) -> gelu -> Row == Linear -> gelu -> Linear."""
    col = ColumnParallelLinear(D_IN, HIDDEN, tp, generator=gen(3))
    row = RowParallelLinear(HIDDEN, D_OUT, tp, generator=gen(4))
    ref_a, ref_b = dense_linear(D_IN, HIDDEN, 3), dense_linear(HIDDEN, D_OUT, 4)
    r = data(*x.shape[:-1], D_OUT, seed=13)
    xp, xd = leaf(x), leaf(x)
    y = row(F.gelu(col(xp)))
    yd = ref_b(F.gelu(ref_a(xd)))
    close(name, "mlp output", y, yd)
    (y * r).sum().backward()
    (yd * r).sum().backward()
    close(name, "mlp input grad", xp.grad, xd.grad)
    close(name, "column weight grad", col.weight.grad, chunk(ref_a.weight.grad, tp, 0))
    close(name, "column bias grad", col.bias.grad, chunk(ref_a.bias.grad, tp, 0))
    close(name, "row weight grad", row.weight.grad, chunk(ref_b.weight.grad, tp, 1))
    close(name, "row bias grad", row.bias.grad, ref_b.bias.grad)


def check_sequence_parallel(tp: MPI.Intracomm) -> None:
    name = "sequence parallel MLP"
    col = ColumnParallelLinear(D_IN, HIDDEN, tp, sequence_parallel=True, generator=gen(5))
    row = RowParallelLinear(HIDDEN, D_OUT, tp, sequence_parallel=True, generator=gen(6))
    ref_a, ref_b = dense_linear(D_IN, HIDDEN, 5), dense_linear(HIDDEN, D_OUT, 6)
    x, r = data(B, S, D_IN, seed=14), data(B, S, D_OUT, seed=15)
    xp, xd = leaf(split_dim(x, tp, 1)), leaf(x)
    y = row(F.gelu(col(xp)))
    yd = ref_b(F.gelu(ref_a(xd)))
    assert y.shape == (B, S // tp.size, D_OUT), y.shape
    close(name, "output chunk", y, chunk(yd, tp, 1))
    (y * chunk(r, tp, 1)).sum().backward()  # the ranks' losses sum to the dense loss
    (yd * r).sum().backward()
    close(name, "input grad chunk", xp.grad, chunk(xd.grad, tp, 1))
    close(name, "column weight grad", col.weight.grad, chunk(ref_a.weight.grad, tp, 0))
    close(name, "column bias grad", col.bias.grad, chunk(ref_a.bias.grad, tp, 0))
    close(name, "row weight grad", row.weight.grad, chunk(ref_b.weight.grad, tp, 1))
    assert row.bias is not None and row.bias.grad is not None
    partial = row.bias.grad.clone()
    sequence_parallel_grads_([row.bias], tp)
    close(name, "row bias grad (summed)", row.bias.grad, ref_b.bias.grad)
    if tp.size > 1:  # without the sum each rank holds only its part of the sequence
        assert not torch.allclose(partial, ref_b.bias.grad, rtol=RTOL, atol=ATOL), partial
    passed(tp, name)


def tokens_all_ranges(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Token ids covering the whole vocabulary (so every rank's range) in a random order."""
    n = math.prod(shape)
    assert n >= VOCAB
    ids = torch.cat([torch.arange(VOCAB), torch.randint(0, VOCAB, (n - VOCAB,),
                                                        generator=gen(seed))])
    return ids[torch.randperm(n, generator=gen(seed + 1))].view(shape)


def check_embedding(tp: MPI.Intracomm) -> None:
    name = "vocab parallel embedding"
    emb = VocabParallelEmbedding(VOCAB, DIM, tp, generator=gen(7))
    ref = dense_embedding(VOCAB, DIM, 7)
    assert emb.start == tp.rank * VOCAB // tp.size, emb.start
    close(name, "weight slice", emb.weight.data, chunk(ref.weight.data, tp, 0))
    tokens = tokens_all_ranges((4, 20), seed=16)
    r = data(4, 20, DIM, seed=17)
    y, yd = emb(tokens), ref(tokens)
    close(name, "output", y, yd)
    (y * r).sum().backward()
    (yd * r).sum().backward()
    close(name, "weight grad rows", emb.weight.grad, chunk(ref.weight.grad, tp, 0))
    passed(tp, name)


def check_cross_entropy(tp: MPI.Intracomm) -> None:
    name = "vocab parallel cross-entropy"
    n = 96
    logits = data(n, VOCAB, seed=18) * 3.0
    target = tokens_all_ranges((n,), seed=19)
    w = data(n, seed=20)  # unequal weights per token: the incoming gradient is not uniform
    per = VOCAB // tp.size
    lp, ld = leaf(chunk(logits, tp, -1)), leaf(logits)
    loss = vocab_parallel_cross_entropy(lp, target, tp, start=tp.rank * per)
    want = F.cross_entropy(ld, target, reduction="none")
    close(name, "per-token losses", loss, want)
    (loss * w).sum().backward()
    (want * w).sum().backward()
    close(name, "logits grad slice", lp.grad, chunk(ld.grad, tp, -1))
    passed(tp, name)


def check_tied_head(tp: MPI.Intracomm) -> None:
    """The embedding weight doubles as the LM head; grads of h and the weight slice agree."""
    name = "tied head"
    emb = VocabParallelEmbedding(VOCAB, DIM, tp, generator=gen(8))
    ref = dense_embedding(VOCAB, DIM, 8)
    tokens = tokens_all_ranges((4, 16), seed=21)
    target = tokens_all_ranges((4, 16), seed=23)
    h = emb(tokens)
    h.retain_grad()
    logits = F.linear(copy_to_tp(h, tp), emb.weight)  # (4, 16, VOCAB / T)
    loss = vocab_parallel_cross_entropy(logits, target, tp, start=emb.start).mean()
    hd = ref(tokens)
    hd.retain_grad()
    want = F.cross_entropy(F.linear(hd, ref.weight).view(-1, VOCAB), target.view(-1))
    close(name, "loss", loss, want)
    loss.backward()
    want.backward()
    close(name, "h grad", h.grad, hd.grad)
    close(name, "weight grad slice", emb.weight.grad, chunk(ref.weight.grad, tp, 0))
    passed(tp, name)


def check_bad_sizes(tp: MPI.Intracomm) -> None:
    bad = 4 * tp.size + 1  # never a multiple of 2 or 4
    cases = {
        "column": lambda: ColumnParallelLinear(D_IN, bad, tp),
        "row": lambda: RowParallelLinear(bad, D_OUT, tp),
        "embedding": lambda: VocabParallelEmbedding(bad, DIM, tp),
    }
    for what, build in cases.items():
        try:
            build()
        except ValueError as exc:
            text = str(exc)
            assert str(bad) in text and str(tp.size) in text, text
            if what != "embedding":
                assert "features do not split" in text, text
            else:
                assert "does not split" in text, text
        else:
            raise AssertionError(f"{what} with {bad} over {tp.size} ranks was accepted")
    passed(tp, "bad sizes raise ValueError")


def check_grid(comm: MPI.Intracomm) -> None:
    """T=2, P=2 on 4 ranks: group sizes, tied ends, unique coordinates, node placement."""
    grid = Grid.create(comm, tensor=2, pipeline=2)
    assert (grid.tensor, grid.pipeline, grid.data) == (2, 2, 1)
    assert (grid.tp_comm.size, grid.pp_comm.size, grid.dp_comm.size) == (2, 2, 1)
    assert grid.tp_comm.rank == grid.tp_rank and grid.pp_comm.rank == grid.pp_rank
    assert grid.tied_comm is not None and grid.tied_comm.size == 2  # stages 0 and 1 are ends
    assert grid.tied_comm.rank == grid.pp_rank
    assert grid.first_stage == (grid.pp_rank == 0) and grid.last_stage == (grid.pp_rank == 1)
    me = (grid.tp_rank, grid.pp_rank, grid.dp_rank)
    everyone = comm.allgather(me)
    assert sorted(everyone) == sorted((t, p, 0) for t in range(2) for p in range(2)), everyone
    # a tensor group shares pp, a pipeline group shares tp (the members' coordinates)
    assert {c[1] for c in grid.tp_comm.allgather(me)} == {grid.pp_rank}
    assert {c[0] for c in grid.pp_comm.allgather(me)} == {grid.tp_rank}
    assert "grid tensor 2 x pipeline 2 x data 1" in grid.describe(), grid.describe()
    grid.free()

    # ranks interleaved over two nodes: the tensor groups still sit inside one node
    node = comm.rank % 2
    grid = Grid.create(comm, tensor=2, pipeline=2, node_index=node)
    assert set(grid.tp_comm.allgather(node)) == {node}
    assert grid.tp_comm.allgather(comm.rank) == [node, node + 2]
    assert grid.tensor_inside_nodes and grid.num_nodes == 2
    assert "on 2 node(s); tensor groups inside nodes" in grid.describe(), grid.describe()
    grid.free()

    # three ranks on one node, one on another: a tensor group crosses nodes and says so
    grid = Grid.create(comm, tensor=2, pipeline=2, node_index=int(comm.rank == 3))
    assert not grid.tensor_inside_nodes
    assert "ACROSS nodes" in grid.describe(), grid.describe()
    grid.free()
    passed(comm, "grid communicators")


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    grid = Grid.create(comm, tensor=comm.size)
    tp = grid.tp_comm
    assert tp.size == comm.size and grid.data == 1 and grid.tied_comm is None
    check_column_split(tp)
    check_column_gathered(tp, data(B, D_IN, seed=30), "column parallel, output gathered")
    passed(tp, "column parallel, output gathered")
    check_mlp(tp, data(B, D_IN, seed=31), "column then row (MLP pattern)")
    passed(tp, "column then row (MLP pattern)")
    check_sequence_parallel(tp)
    check_embedding(tp)
    check_cross_entropy(tp)
    check_tied_head(tp)
    x3 = data(B, S, D_IN, seed=32)  # (batch, seq, features)
    check_column_gathered(tp, x3, "3-D inputs")
    check_mlp(tp, x3, "3-D inputs")
    passed(tp, "3-D inputs")
    check_bad_sizes(tp)
    if comm.size == 4:
        check_grid(comm)
    grid.free()
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
