"""Scenario (mpiexec -n 2): ``--compile`` keeps the buckets launching during backward.

DataParallel over an MLP, eager / compiled by regions / compiled whole (``aot_eager``: the
same graphs as inductor's, without code generation): the losses agree (rtol 1e-5), and with
regions the last layer's bucket is launched before the first region's backward starts (its
output's gradient hook), as in eager mode. Prints PASS lines.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from mpitrain.grad import DataParallel
from mpitrain.grad.compile import compile_model
from mpitrain.runtime.abort import run_mpi


def run(comm: MPI.Intracomm, mode: str) -> tuple[list[float], list[list[str]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    compile_model(model, mode, backend="aot_eager")
    dp = DataParallel(model, comm=comm, bucket_mb=0.05)  # the last layer's bucket alone
    order: list[str] = []
    launch = dp.engine._launch

    def recorded(b: int) -> None:
        order.append(f"launch {b}")
        launch(b)

    dp.engine._launch = recorded  # type: ignore[method-assign]

    def mark(_mod: object, _inp: object, out: torch.Tensor) -> None:
        # between regions (outside any compiled graph): its gradient is ready when the
        # backward reaches region 0, which then still has to run
        out.register_hook(lambda grad: order.append("region 0 backward"))

    if mode != "full":  # one graph has no point between regions to observe
        model[0].register_forward_hook(mark)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1 + comm.rank)
    losses, orders = [], []
    for _ in range(6):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        order.clear()
        loss = torch.nn.functional.cross_entropy(dp(x), y)
        loss.backward()
        dp.synchronize()
        opt.step()
        losses.append(float(loss.detach()))
        orders.append(list(order))
    dp.close()
    return losses, orders


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    eager, eager_order = run(comm, "none")
    for mode in ("regions", "full"):
        got, order = run(comm, mode)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(eager), rtol=1e-5, atol=0)
        if comm.rank == 0:
            print(f"PASS {mode} == eager", flush=True)
        if mode == "regions":  # a bucket in flight while region 0's backward computes
            for o in [*order[1:], *eager_order[1:]]:  # from step 2 (buckets by ready order)
                assert any(e.startswith("launch") for e in o[:o.index("region 0 backward")]), o
            if comm.rank == 0:
                print("PASS regions launch buckets before backward ends", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
