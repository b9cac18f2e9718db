"""Sharded checkpoints: save on N ranks, resume on M, consolidate to a plain state_dict.

Run by hand (the directory is shared by the two runs)::

    mpiexec -n 4 python tests/mpi/scenarios/zero_checkpoint.py save DIR
    mpiexec -n 2 python tests/mpi/scenarios/zero_checkpoint.py resume DIR

``save`` trains a stage-2 model with Adam for 2 steps and writes DIR/ckpt (sharded) and
DIR/reference.pt (rank 0's plain state_dict at that moment). ``resume`` loads DIR/ckpt into a
stage-1 and a stage-2 model on M ranks and trains 2 more steps; the reference is the same
state loaded into an unsharded DataParallel model with a full Adam, trained the same way.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI
from torch import nn

from mpitrain import DataParallel
from mpitrain.checkpoint.shards import (
    MANIFEST,
    load_full,
    optimizer_state_dict,
    shard_name,
    write_consolidated,
)
from mpitrain.errors import CheckpointError
from mpitrain.grad.zero import ShardedDataParallel, load_sharded, save_sharded
from mpitrain.runtime.abort import run_mpi

B, D_IN, D_OUT = 8, 13, 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no bias in front of BatchNorm: its true gradient is 0, and Adam would turn the
        # rounding noise of its sum (sign set by the summation order) into steps of +-lr
        self.a = nn.Linear(D_IN, 31, bias=False)
        self.bn = nn.BatchNorm1d(31)
        self.c = nn.Linear(31, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.bn(self.a(x))))


def chunk(comm: MPI.Intracomm, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99 + s)
    x = torch.randn(comm.size * B, D_IN, generator=g)
    y = torch.randn(comm.size * B, D_OUT, generator=g)
    return x[comm.rank * B : (comm.rank + 1) * B], y[comm.rank * B : (comm.rank + 1) * B]


def adam(params: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)  # type: ignore[arg-type]


def train(model: DataParallel | ShardedDataParallel, opt: torch.optim.Optimizer,
          comm: MPI.Intracomm, steps: range) -> None:
    for s in steps:
        x, y = chunk(comm, s)
        ((model(x) - y) ** 2).mean().backward()
        model.synchronize()
        if isinstance(model, ShardedDataParallel):
            model.step(opt)
            model.zero_grad()
        else:
            opt.step()
            opt.zero_grad()


def passed(comm: MPI.Intracomm, name: str) -> None:
    if comm.rank == 0:
        print(f"PASS {name} (n={comm.size})", flush=True)


def save(comm: MPI.Intracomm, root: Path) -> None:
    torch.manual_seed(5 + comm.rank)
    model = ShardedDataParallel(Net(), comm=comm, stage=3, bucket_mb=0.002)  # saved by ZeRO-3
    opt = adam(model.parameters())
    train(model, opt, comm, range(2))
    out = save_sharded(model, opt, root / "ckpt", extra={"step": 2})
    assert out.name == MANIFEST and out.exists()
    with model.gathered():
        if comm.rank == 0:
            torch.save({k: v.clone() for k, v in model.module.state_dict().items()},
                       root / "reference.pt")
    comm.Barrier()
    passed(comm, "save")


def resume(comm: MPI.Intracomm, root: Path) -> None:
    ckpt = root / "ckpt"
    full = load_full(ckpt)
    names = [n for n, _ in Net().named_parameters()]
    # consolidate == the unsharded model at save time
    if comm.rank == 0:
        state = write_consolidated(ckpt, root / "full.pt")
        ref = torch.load(root / "reference.pt", weights_only=True)
        assert list(state) == list(ref)
        for k, v in ref.items():
            assert torch.equal(state[k], v), k
        assert torch.load(root / "full.pt", weights_only=True).keys() == ref.keys()
    passed(comm, "consolidate equals the unsharded model")
    # reference: the same state in an unsharded DataParallel + full Adam, on M ranks
    net = Net()
    net.load_state_dict(full["model"])
    dp = DataParallel(net, comm=comm, bucket_mb=0.002)
    dp_opt = adam(dp.module.parameters())
    dp_opt.load_state_dict(optimizer_state_dict(full, names))
    train(dp, dp_opt, comm, range(2, 4))
    for stage in (1, 2, 3):
        torch.manual_seed(1000 + comm.rank)  # different init: the load must overwrite it
        model = ShardedDataParallel(Net(), comm=comm, stage=stage, bucket_mb=0.001)
        opt = adam(model.parameters())
        extra = load_sharded(model, opt, ckpt)
        assert extra == {"step": 2}, extra
        train(model, opt, comm, range(2, 4))
        with model.gathered():
            got = {k: v.clone() for k, v in model.module.state_dict().items()}
        for (k, a), (_, b) in zip(got.items(), dp.module.state_dict().items(), strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=k, s=stage: f"stage {s} {k}: {m}")
            else:
                assert torch.equal(a, b), k
    passed(comm, "resume re-shards and continues like an unsharded run")
    damaged(comm, root)


def damaged(comm: MPI.Intracomm, root: Path) -> None:
    """A damaged shard or a missing manifest is a CheckpointError naming the file."""
    bad = root / f"bad-{comm.rank}"
    shutil.rmtree(bad, ignore_errors=True)
    bad.mkdir()
    doc = (root / "ckpt" / MANIFEST).read_text()
    n = json.loads(doc)["ranks"]
    for r in range(n):
        data = bytearray((root / "ckpt" / shard_name(r, n)).read_bytes())
        if r == 0:
            data[len(data) // 2] ^= 1  # one flipped bit
        (bad / shard_name(r, n)).write_bytes(bytes(data))
    try:
        load_full(bad)
        raise AssertionError("missing manifest accepted")
    except CheckpointError as exc:
        assert MANIFEST in str(exc) and "HINT" in str(exc), exc
    (bad / MANIFEST).write_text(doc)
    try:
        load_full(bad)
        raise AssertionError("damaged shard accepted")
    except CheckpointError as exc:
        assert shard_name(0, n) in str(exc) and "damaged" in str(exc), exc
    passed(comm, "damaged or unfinished checkpoint is refused")


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    phase, root = sys.argv[1], Path(sys.argv[2])
    if phase == "save":
        save(comm, root)
    else:
        resume(comm, root)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
