"""ZeRO's shard transports: hierarchical and staged == flat; training with them == sync DP.

Run by hand: mpiexec -n 4 python tests/mpi/scenarios/zero_transports.py
Prints one "PASS <check>" line per check on rank 0; any failure raises (non-zero exit).
Node layouts are made on one host by splitting the world (block and round-robin placement).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
from mpi4py import MPI

from mpitrain.comm.factory import describe_shards, make_shard_comm
from mpitrain.comm.shards import FlatShards, HierarchicalShards, ShardComm
from mpitrain.grad.zero.wrapper import ShardedDataParallel
from mpitrain.runtime.abort import run_mpi
from mpitrain.runtime.world import World
from tests.mpi.scenarios.zero_equivalence import Deep, Mlp, check_close, passed, train


def world_of(comm: MPI.Intracomm, color: int) -> World:
    """A World whose "node" is ``color`` (any placement of ranks on nodes)."""
    own = comm.Dup()
    node = cast("MPI.Intracomm", own.Split(color, own.rank))
    cross = cast("MPI.Intracomm", own.Split(node.rank, own.rank))
    index = node.bcast(cross.rank if node.rank == 0 else None, root=0)
    nodes = node.bcast(cross.size if node.rank == 0 else None, root=0)
    return World(comm=own, node_comm=node, cross_comm=cross, rank=own.rank, size=own.size,
                 local_rank=node.rank, local_size=node.size, node_index=int(index),
                 num_nodes=int(nodes), hostname="host")


def layouts(comm: MPI.Intracomm) -> dict[str, World]:
    r, n = comm.rank, comm.size
    out = {"2x2 block": world_of(comm, r // 2), "2x2 round-robin": world_of(comm, r % 2),
           f"{n}x1": world_of(comm, r), f"1x{n}": world_of(comm, 0)}
    return out


def exact_data(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integers: every summation order gives the same float result."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, (n,), generator=g).to(dtype)


def check_collectives(comm: MPI.Intracomm, name: str, world: World) -> None:
    size, rank = comm.size, comm.rank
    flat = FlatShards(comm.Dup())
    hier = make_shard_comm(world, device=torch.device("cpu"), algo="hierarchical")
    staged = make_shard_comm(world, device=torch.device("cpu"), algo="hierarchical", staged=True)
    uniform = world.num_nodes > 1 and world.local_size > 1
    assert isinstance(hier, HierarchicalShards) == uniform, describe_shards(hier)
    assert describe_shards(staged).startswith("Staged("), describe_shards(staged)
    for chunk in (1, 7, 1000):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            send = exact_data(size * chunk, 10 * chunk + rank, dtype)
            want = torch.empty(chunk, dtype=dtype)
            flat.ireduce_scatter_(send.clone(), want, average=False).wait()
            total = sum(exact_data(size * chunk, 10 * chunk + r, torch.float64)
                        for r in range(size))
            assert torch.equal(want.double(), total[rank * chunk : (rank + 1) * chunk])
            ts: list[ShardComm] = [hier, staged]
            for t in ts:
                got = torch.empty(chunk, dtype=dtype)
                t.ireduce_scatter_(send.clone(), got, average=False).wait()
                assert torch.equal(got, want), (name, describe_shards(t), chunk, dtype)
                inplace = send.clone()
                t.ireduce_scatter_(inplace, None, average=False).wait()
                assert torch.equal(inplace[:chunk], want), (name, "in place", chunk)
            # several in flight at once, waited in reverse order
            sends = [exact_data(size * chunk, 99 + i + rank, dtype) for i in range(3)]
            outs = [torch.empty(chunk, dtype=dtype) for _ in sends]
            refs = [torch.empty(chunk, dtype=dtype) for _ in sends]
            for s, o in zip(sends, refs, strict=True):
                flat.ireduce_scatter_(s.clone(), o, average=True).wait()
            hs = [hier.ireduce_scatter_(s.clone(), o, average=True)
                  for s, o in zip(sends, outs, strict=True)]
            for h in reversed(hs):
                h.wait()
            for o, ref in zip(outs, refs, strict=True):
                assert torch.equal(o, ref), (name, "in flight", chunk, dtype)
            # all-gather: every chunk from its owner
            full = torch.full((size * chunk,), -1.0, dtype=dtype)
            full[rank * chunk : (rank + 1) * chunk] = rank + torch.arange(chunk).to(dtype) % 7
            want_full = torch.cat([r + torch.arange(chunk).to(dtype) % 7 for r in range(size)])
            for t in (flat, hier, staged):
                got_full = full.clone()
                t.iallgather_(got_full).wait()
                assert torch.equal(got_full, want_full), (name, describe_shards(t), chunk)
    for t in (flat, hier, staged):
        t.free()
    passed(comm, f"transports == flat, {name}")


def check_training(comm: MPI.Intracomm) -> None:
    """Stages 1-3 over hierarchical (2 x 2 pretend nodes) and staged == sync DataParallel."""
    for opt_name in ("sgd-momentum", "adam"):
        for cls in (Mlp, Deep):
            want, _, _ = train(comm, cls, opt_name, 0)
            other, _, _ = train(comm, cls, opt_name, 0, other_order=True)
            check_close(comm, f"{opt_name} reference summed in another order", other, want)
            for stage in (1, 2, 3):
                for kw in ({"algo": "hierarchical"}, {"algo": "hierarchical", "staged": True},
                           {"staged": True}):
                    world = World.create(comm, ranks_per_node=2)
                    got, w, _ = train(comm, cls, opt_name, stage, sdp=kw, world=world)
                    check_close(comm, f"stage {stage} {opt_name} {kw}", got, want,
                                w if stage == 3 else None)
                    w.close()  # type: ignore[union-attr]
                    world.free()
    passed(comm, "stages 1-3 over hierarchical and staged transports == sync data parallel")
    want, _, _ = train(comm, Mlp, "sgd-momentum", 0, compression="bf16")
    for stage in (2, 3):
        world = World.create(comm, ranks_per_node=2)
        got, w, _ = train(comm, Mlp, "sgd-momentum", stage, compression="bf16",
                          sdp={"algo": "hierarchical"}, world=world)
        check_close(comm, f"bf16 stage {stage}", got, want, w if stage == 3 else None,
                    2e-2, 2e-3)
        w.close()  # type: ignore[union-attr]
        world.free()
    passed(comm, "bf16 compression over the hierarchical reduce-scatter")


def check_scaler(comm: MPI.Intracomm) -> None:
    """fp16 loss scaling over shards: an overflow in one rank's shard skips every rank's step."""
    from mpitrain.grad.zero import ShardedDataParallel
    from tests.mpi.scenarios.zero_equivalence import make, mse, my_chunk

    for stage in (1, 2, 3):
        sdp = ShardedDataParallel(make(Mlp, comm), comm=comm, stage=stage, bucket_mb=0.001)
        opt = torch.optim.SGD(list(sdp.parameters()), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        before = [s.detach().clone() for s in sdp.shards]
        for step in range(2):
            x, y = my_chunk(comm, step)
            scaler.scale(mse(sdp(x), y)).backward()
            sdp.synchronize()
            if step == 0 and comm.rank == comm.size - 1:  # this rank's shard overflowed
                sdp.grads.shard_grads[-1].view(-1)[-1] = float("inf")
            sdp.unscale_(opt, scaler)
            sdp.scaled_step(opt, scaler)
            sdp.zero_grad()
            scales = comm.allgather(scaler.get_scale())
            assert len(set(scales)) == 1, (stage, step, scales)
            if step == 0:
                assert scales[0] == 512.0, scales  # skipped and backed off, on every rank
                for a, b in zip(sdp.shards, before, strict=True):
                    assert torch.equal(a.detach(), b), (stage, "a skipped step changed a shard")
        assert any(not torch.equal(a.detach(), b) for a, b in zip(sdp.shards, before,
                                                                  strict=True))
        sdp.close()
    passed(comm, "fp16 loss scaler: an overflow in one rank's shard skips every rank's step")


def check_thread(comm: MPI.Intracomm) -> None:
    """Stages 1-3 with the reduce-scatters and all-gathers on communication threads
    (``progress="thread"``) == on the main thread, bit for bit (the same MPI calls)."""
    for stage in (1, 2, 3):
        _, ref, _ = train(comm, Deep, "adam", stage)
        _, w, _ = train(comm, Deep, "adam", stage, sdp={"progress": "thread"})
        assert isinstance(w, ShardedDataParallel) and isinstance(ref, ShardedDataParallel)
        assert describe_shards(w.transport).startswith("Thread("), describe_shards(w.transport)
        for a, b in zip(w.parameters(), ref.parameters(), strict=True):  # the stepped shards
            assert torch.equal(a, b), stage
        w.close()
        ref.close()
    passed(comm, "stages 1-3 with the collectives on communication threads == main thread")


def main(comm: MPI.Intracomm) -> int:
    torch.set_num_threads(1)
    assert comm.size == 4, "run with 4 ranks"
    for name, world in layouts(comm).items():
        check_collectives(comm, name, world)
        world.free()
    check_training(comm)
    check_thread(comm)
    check_scaler(comm)
    comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(run_mpi(main))
