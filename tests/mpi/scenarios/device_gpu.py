"""GPU scenario: one rank per GPU (or ranks sharing one GPU with --allow-shared).

    OMP_NUM_THREADS=1 mpiexec -n 2 python tests/mpi/scenarios/device_gpu.py [--allow-shared]
    (``--cpu`` runs the same checks on host tensors, as a smoke test without a GPU)

Binds devices, runs the real CUDA-aware decision (query, hints, guarded probe), builds the
reducer the trainer would build and checks device all-reduces (flat and hierarchical, staged
and, where the decision allows, CUDA-aware) against the host result. Rank 0 prints ``OK ...``
lines and ``DECISION ...``. Never run in this project's CI (no GPU there).
"""

from __future__ import annotations

import sys
import traceback

import torch
from mpi4py import MPI

from mpitrain.comm.factory import describe, make_reducer
from mpitrain.comm.reducer import FlatReducer
from mpitrain.runtime.abort import abort_job, run_mpi
from mpitrain.runtime.cuda_aware import decide_cuda_aware, facts_lines
from mpitrain.runtime.device import bind_device
from mpitrain.runtime.world import World


def main(comm: MPI.Intracomm) -> int:
    out: list[str] = []
    try:
        world = World.create(comm)
        mode = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: smoke run without a GPU
        device = bind_device(world, mode, allow_shared="--allow-shared" in sys.argv)
        decision = decide_cuda_aware(world.comm, device, "auto")
        out += [f"FACT {line}" for line in facts_lines(world.comm)]
        out.append(f"DECISION {decision.describe()}")
        host = FlatReducer(world.comm.Dup(), overlap=True)
        stacks = [(algo, staged) for algo in ("flat", "hierarchical") for staged in (True, None)]
        for algo, staged in stacks:
            r = make_reducer(world, device=device, cuda_aware=decision, algo=algo, staged=staged)
            for dtype, n in (
                (torch.float32, 1 << 20),
                (torch.float16, 4097),
                (torch.bfloat16, 999),
            ):
                g = torch.Generator().manual_seed(world.rank + n)
                x = torch.randn(n, generator=g).to(dtype)
                ref = x.clone()
                host.allreduce_(ref, average=True)
                d = x.to(device)
                r.iallreduce_(d, average=True).wait()
                got = d.cpu()
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            out.append(f"OK {describe(r)} on {device} == host all-reduce")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(comm, 1)
    if comm.rank == 0:
        print("\n".join(out))
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
