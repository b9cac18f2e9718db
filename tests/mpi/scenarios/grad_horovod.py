"""A typical Horovod PyTorch training script, run with ``import mpitrain.horovod as hvd``.

Only Horovod's public API names are used below the import line. Run by hand:
mpiexec -n 2 python tests/mpi/scenarios/grad_horovod.py [--fp16]
Rank 0 prints "PASS ..." lines and "ACCURACY <x>"; any failed check raises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn, optim

import mpitrain.horovod as hvd
from mpitrain.runtime.abort import run_mpi


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def metric_average(val: float, name: str) -> float:
    tensor = torch.tensor(val)
    avg_tensor = hvd.allreduce(tensor, name=name)
    return float(avg_tensor.item())


def main(comm: object) -> int:
    """Train like a Horovod user script (hvd.init() on COMM_WORLD; ``comm`` unused)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp16-allreduce", action="store_true")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batches-per-allreduce", type=int, default=1)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(42 + hvd.rank())  # different init per rank: broadcast must fix it
    torch.set_num_threads(1)
    assert hvd.is_initialized() and hvd.size() >= 2
    assert 0 <= hvd.local_rank() < hvd.local_size() and 0 <= hvd.cross_rank() < hvd.cross_size()
    assert isinstance(hvd.mpi_threads_supported(), bool)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    # the usual DistributedSampler-style sharding
    x_mine, y_mine = x_train[hvd.rank() :: hvd.size()], y_train[hvd.rank() :: hvd.size()]

    model = Net()
    optimizer = optim.SGD(model.parameters(), lr=0.05 * hvd.size(), momentum=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=compression,
        backward_passes_per_step=args.batches_per_allreduce,
        op=hvd.Average,
    )
    lr0 = optimizer.param_groups[0]["lr"]
    assert all(g["lr"] == lr0 for g in hvd.allgather_object(optimizer.param_groups[0]))

    batch = 32
    first_loss = last_loss = None
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_mine), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for i in range(0, len(perm) - batch + 1, batch * args.batches_per_allreduce):
            optimizer.zero_grad()
            for j in range(args.batches_per_allreduce):
                idx = perm[i + j * batch : i + (j + 1) * batch]
                if len(idx) < batch:
                    break
                loss = F.cross_entropy(model(x_mine[idx]), y_mine[idx])
                (loss / args.batches_per_allreduce).backward()
                total += loss.item()
            optimizer.step()
        avg = metric_average(total, "avg_loss")
        first_loss = avg if first_loss is None else first_loss
        last_loss = avg

    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).float().mean().item()
    acc = metric_average(correct, "avg_accuracy")
    assert first_loss is not None and last_loss is not None and last_loss < first_loss / 3

    # every rank holds the same weights
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(hvd.broadcast(flat, root_rank=0), flat)
    # the rest of the public API
    t = torch.full((3,), float(hvd.rank()))
    h = hvd.allreduce_async_(t, op=hvd.Sum)
    while not hvd.poll(h):
        pass
    assert torch.equal(hvd.synchronize(h), torch.full((3,), float(sum(range(hvd.size())))))
    g = hvd.allgather(torch.full((hvd.rank() + 1, 2), hvd.rank()))
    assert g.shape == (sum(range(1, hvd.size() + 1)), 2) and int(g[-1, 0]) == hvd.size() - 1
    assert hvd.broadcast_object({"epoch": hvd.rank()}, root_rank=0) == {"epoch": 0}
    b = torch.full((2,), float(hvd.rank()))
    hvd.broadcast_(b, root_rank=1)
    assert torch.equal(b, torch.ones(2))
    s = hvd.allreduce(torch.ones(4), op=hvd.Sum, compression=hvd.Compression.fp16)
    assert s.dtype == torch.float32 and torch.equal(s, torch.full((4,), float(hvd.size())))
    try:
        hvd.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)
    except NotImplementedError as exc:
        assert "Adasum" in str(exc) or "adasum" in str(exc)
    else:
        raise AssertionError("Adasum accepted")
    hvd.join()
    if hvd.rank() == 0:
        print(f"PASS horovod script trains (loss {first_loss:.3f} -> {last_loss:.3f})")
        print(f"ACCURACY {acc:.4f}", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
