"""Scenario: what each rank sees on the emulated cluster, and all-reduces across its nodes.

Run by hand (as root):
  python -m mpitrain cluster up --nodes 2
  python -m mpitrain cluster mpiexec -n 4 --per-node 2 -- \\
      python tests/cluster/scenarios/topology.py 8 --reducers
Checks, each raising on failure (which aborts the whole job):
- an ``MIB`` MiB float32 all-reduce of integer-valued data equals the exact sum;
- with ``--reducers``: mpitrain's World (num_nodes, local ranks) and its hierarchical
  all-reduce (both variants) against the flat one: bitwise on integer-valued data, and on
  random data within the float32 bound |a - b| <= 4 * eps * sum_i |x_i| per element (two
  summation orders of the same terms).
Rank 0 prints ``RESULT <json>`` with every rank's facts.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np
from mpi4py import MPI

from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.world import World

EPS32 = float(np.finfo(np.float32).eps)


def exact_allreduce(comm: MPI.Intracomm, mib: int) -> dict[str, Any]:
    """All-reduce ``mib`` MiB of integer-valued float32 (every sum is exact); check it."""
    n = mib * (1 << 20) // 4
    base = (np.arange(n, dtype=np.int64) % 1000).astype(np.float32)
    x = base + np.float32(comm.rank)
    comm.Barrier()
    t0 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, x)
    seconds = time.perf_counter() - t0
    want = base * comm.size + np.float32(comm.size * (comm.size - 1) // 2)
    if not np.array_equal(x, want):
        bad = int(np.flatnonzero(x != want)[0])
        raise AssertionError(f"rank {comm.rank}: allreduce[{bad}] = {x[bad]}, want {want[bad]}")
    return {"allreduce_bytes": int(x.nbytes), "allreduce_s": seconds}


def compare_reducers(world: World) -> dict[str, Any]:
    """Hierarchical (both variants) against flat, bitwise and within the float bound."""
    import torch

    from mpitrain.comm.hierarchical import HierarchicalReducer
    from mpitrain.comm.reducer import FlatReducer

    flat = FlatReducer(world.comm)
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1234 + world.rank)
    for variant in ("reduce_bcast", "rs_ag"):
        hier = HierarchicalReducer.create(world, variant=variant)
        for kind in ("ints", "floats"):
            n = 1 << 18  # 1 MiB of float32; odd sizes exercise rs_ag's padding
            n += 3 if variant == "rs_ag" else 0
            if kind == "ints":
                x = torch.randint(-1000, 1000, (n,), generator=gen).float()
            else:
                x = torch.randn(n, generator=gen)
            a, b, mag = x.clone(), x.clone(), x.abs()
            flat.allreduce_(a, average=False)
            hier.allreduce_(b, average=False)
            flat.allreduce_(mag, average=False)
            diff = (a - b).abs()
            if kind == "ints" and not torch.equal(a, b):
                raise AssertionError(f"rank {world.rank}: {variant} != flat on integers")
            limit = 4 * EPS32 * mag
            if bool((diff > limit).any()):
                worst = float((diff / mag.clamp_min(1e-30)).max())
                raise AssertionError(f"rank {world.rank}: {variant} off by {worst:.3g} relative")
            out[f"{variant}_{kind}_max_abs_diff"] = float(diff.max())
            out[f"{variant}_{kind}_bitwise"] = bool(torch.equal(a, b))
        hier.free()
    return out


def main(comm: MPI.Intracomm) -> int:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    facts: dict[str, Any] = {
        "rank": comm.rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "shared_size": node.size,
        "shared_rank": node.rank,
        **exact_allreduce(comm, mib),
    }
    if "--reducers" in sys.argv:
        world = World.create(comm)
        facts.update(num_nodes=world.num_nodes, local_rank=world.local_rank,
                     local_size=world.local_size, node_index=world.node_index)  # fmt: skip
        facts.update(compare_reducers(world))
        world.free()
    node.Free()
    every = comm.gather(facts, root=0)
    if comm.rank == 0:
        print("RESULT " + json.dumps(every), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
