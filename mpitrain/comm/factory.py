"""Build the transport for a run: flat or hierarchical, host, staged or CUDA-aware.

=========  ==============  ===============================================================
device     decision        reducer
=========  ==============  ===============================================================
cpu        (none)          host reducer (Flat or Hierarchical); ``staged=True`` wraps it in
                           StagedReducer (CI's forced staged mode)
cuda       CUDA-aware      CudaAwareReducer(Direct or Hierarchical on device buffers),
                           bfloat16 through a StagedReducer fallback
cuda       not CUDA-aware  StagedReducer(host reducer)
=========  ==============  ===============================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI

    from mpitrain.comm.reducer import Reducer
    from mpitrain.comm.shards import ShardComm
    from mpitrain.runtime.cuda_aware import Decision
    from mpitrain.runtime.world import World
    from mpitrain.timeline.recorder import Timeline

ALGOS = ("flat", "hierarchical", "auto")


def choose_algo(algo: str, num_nodes: int, max_local_size: int, num_hosts: int) -> str:
    """Resolve ``auto``: hierarchical when ranks span several hosts and a node holds several.

    Pretend nodes on one host (MPITRAIN_RANKS_PER_NODE) resolve to flat: there every link is
    shared memory and flat all-reduce was measured faster at every size (docs/gpu.md).
    """
    if algo not in ALGOS:
        raise ConfigError(with_hint(f"--allreduce {algo!r} is unknown", f"use one of {ALGOS}"))
    if algo != "auto":
        return algo
    return "hierarchical" if num_hosts > 1 and num_nodes > 1 and max_local_size > 1 else "flat"


def _plan(
    world: World, algo: str, device: torch.device, aware: bool, staged: bool | None
) -> tuple[bool, bool]:
    """Collective: (hierarchical?, same ranks on every node?) for ``algo`` on this layout;
    refuses a device without CUDA-aware MPI when staging is disabled (same on every rank)."""
    from mpi4py import MPI

    lo = int(world.comm.allreduce(world.local_size, op=MPI.MIN))
    hi = int(world.comm.allreduce(world.local_size, op=MPI.MAX))
    hosts = len(set(world.comm.allgather(world.hostname)))
    resolved = choose_algo(algo, world.num_nodes, hi, hosts)
    if device.type == "cuda" and not aware and staged is False:
        raise ConfigError(with_hint(
            "staging was disabled but this MPI is not CUDA-aware (or was not checked)",
            "allow staging, or use --cuda-aware yes with a CUDA-aware MPI"))
    return resolved == "hierarchical", lo == hi and hi > 1


def make_reducer(
    world: World,
    *,
    device: torch.device,
    cuda_aware: Decision | None,
    algo: str = "auto",
    staged: bool | None = None,
    overlap: bool | None = None,
    variant: str = "auto",
    progress: str = "poll",
) -> Reducer:
    """Collective: build the reducer for ``device`` (same choice on every rank).

    Args:
        cuda_aware: the agreed :func:`~mpitrain.runtime.cuda_aware.decide_cuda_aware`
            decision (None: not decided, i.e. not CUDA-aware).
        algo: ``flat``, ``hierarchical`` or ``auto``.
        staged: True forces staging (also on CPU tensors); False forbids it (error on a GPU
            without CUDA-aware MPI); None picks.
        overlap: passed to FlatReducer (non-blocking or blocking MPI call).
        variant: hierarchical variant (``reduce_bcast``, ``rs_ag`` or ``auto`` by size).
        progress: ``thread`` runs the stack's blocking calls on a communication thread
            (:class:`~mpitrain.comm.threaded.ThreadReducer`); ``poll`` / ``mpi`` leave the
            non-blocking calls to the engine's waits / the MPI library's progress thread.
    """
    stack = _make_stack(world, device=device, cuda_aware=cuda_aware, algo=algo, staged=staged,
                        overlap=overlap, variant=variant)
    if progress == "thread":
        from mpitrain.comm.threaded import ThreadReducer

        return ThreadReducer(stack, world.rank)
    return stack


def _make_stack(
    world: World, *, device: torch.device, cuda_aware: Decision | None, algo: str,
    staged: bool | None, overlap: bool | None, variant: str,
) -> Reducer:
    """The transport stack without its progress choice (:func:`make_reducer`)."""
    from mpitrain.comm.cuda_aware import CudaAwareReducer, DirectReducer
    from mpitrain.comm.hierarchical import HierarchicalReducer
    from mpitrain.comm.reducer import FlatReducer
    from mpitrain.comm.staged import StagedReducer

    use_aware = device.type == "cuda" and cuda_aware is not None and cuda_aware.use_cuda_aware
    hier = _plan(world, algo, device, use_aware, staged)[0]

    def host() -> Reducer:
        # own communicators: a staged reducer starts its MPI calls lazily (at the next
        # bucket or at test()), which must never interleave with others' calls on a shared comm
        if hier:
            return HierarchicalReducer.create(world, variant=variant)
        return FlatReducer(derived(world.comm.Dup()), overlap=overlap)

    if device.type == "cuda" and use_aware and staged is not True:
        inner: Reducer = (
            HierarchicalReducer.create(world, variant=variant)
            if hier
            else DirectReducer(derived(world.comm.Dup()))
        )
        return CudaAwareReducer(inner, fallback=StagedReducer(host()))
    if device.type == "cuda" or staged:
        return StagedReducer(host())
    return host()


def describe(reducer: Reducer) -> str:
    """One log line naming the transport stack, e.g. ``Staged(Hierarchical[auto])``."""
    from mpitrain.comm.cuda_aware import CudaAwareReducer
    from mpitrain.comm.hierarchical import HierarchicalReducer
    from mpitrain.comm.staged import StagedReducer
    from mpitrain.comm.threaded import ThreadReducer

    if isinstance(reducer, StagedReducer):
        return f"Staged({describe(reducer.inner)})"
    if isinstance(reducer, CudaAwareReducer):
        return f"CudaAware({describe(reducer.inner)})"
    if isinstance(reducer, HierarchicalReducer):
        return f"Hierarchical[{reducer.variant}]"
    if isinstance(reducer, ThreadReducer):
        return f"Thread({describe(reducer.inner)})"
    return type(reducer).__name__.removesuffix("Reducer")


def set_shard_timeline(transport: ShardComm, recorder: Timeline) -> None:
    """Let a shard transport's communication thread record into ``recorder`` (if any)."""
    from mpitrain.comm.threaded import ThreadShards

    if isinstance(transport, ThreadShards):
        transport.set_timeline(recorder)


def close_shard_thread(transport: ShardComm) -> None:
    """Stop a shard transport's communication thread, if it has one (not collective)."""
    from mpitrain.comm.threaded import ThreadShards

    if isinstance(transport, ThreadShards):
        transport.thread.close()


def set_reducer_timeline(reducer: Reducer, recorder: Timeline) -> None:
    """Let a reducer stack's communication thread record into ``recorder`` (if it has one)."""
    from mpitrain.comm.threaded import ThreadReducer

    if isinstance(reducer, ThreadReducer):
        reducer.set_timeline(recorder)


def close_reducer(reducer: Reducer) -> None:
    """Stop what a reducer stack runs besides MPI calls (the communication thread)."""
    from mpitrain.comm.threaded import ThreadReducer

    if isinstance(reducer, ThreadReducer):
        reducer.close()


def default_reducer(
    comm: MPI.Intracomm, params: Iterable[torch.Tensor], *, overlap: bool
) -> Reducer:
    """Return the reducer a wrapper uses when given none (not collective).

    Host MPI (:class:`FlatReducer`) for CPU parameters; for parameters on a device, the same
    staged through reused host buffers, which is correct with any MPI. For CUDA-aware MPI pass
    ``make_reducer(...)``'s result instead (that choice is collective: it probes the MPI).
    """
    from mpitrain.comm.reducer import FlatReducer
    from mpitrain.comm.staged import StagedReducer

    flat = FlatReducer(comm, overlap=overlap)
    if any(p.device.type != "cpu" for p in params):
        return StagedReducer(flat)
    return flat


def make_shard_comm(
    world: World,
    *,
    device: torch.device,
    cuda_aware: bool = False,
    algo: str = "flat",
    staged: bool | None = None,
    progress: str = "poll",
) -> ShardComm:
    """Collective: the reduce-scatter / all-gather transport for ZeRO shards on ``device``.

    Same table as :func:`make_reducer`: host tensors use MPI directly (``staged=True`` forces
    the staged path, as CI does); device tensors go to MPI directly when ``cuda_aware`` (the
    agreed decision) and ``staged`` is not True, else through host buffers. ``algo``
    ``hierarchical`` (or ``auto`` on real node boundaries with several ranks per node) splits
    each collective into an intra-node and a cross-node part; it needs the same number of
    ranks on every node and falls back to flat otherwise (:func:`describe_shards` says so).
    Every call builds new communicators (one transport per stream of collectives).
    ``progress`` ``thread`` runs the transport's calls on its own communication thread
    (:class:`~mpitrain.comm.threaded.ThreadShards`).
    """
    stack = _shard_stack(world, device=device, cuda_aware=cuda_aware, algo=algo, staged=staged)
    if progress == "thread":
        from mpitrain.comm.threaded import ThreadShards

        return ThreadShards(stack, world.rank)
    return stack


def _shard_stack(world: World, *, device: torch.device, cuda_aware: bool, algo: str,
                 staged: bool | None) -> ShardComm:
    """The shard transport without its progress choice (:func:`make_shard_comm`)."""

    from mpitrain.comm.shards import CudaAwareShards, FlatShards, HierarchicalShards, StagedShards

    hier, uniform = _plan(world, algo, device, cuda_aware, staged)
    hier = hier and uniform and world.num_nodes > 1

    def host() -> ShardComm:
        if hier:
            return HierarchicalShards.create(world, world.size)
        return FlatShards(derived(world.comm.Dup()))

    if device.type == "cuda" and cuda_aware and staged is not True:
        return CudaAwareShards(host(), fallback=StagedShards(host()))
    if device.type == "cuda" or staged:
        return StagedShards(host())
    return host()


def describe_shards(transport: ShardComm) -> str:
    """One log line naming a shard transport stack, e.g. ``Staged(HierarchicalShards)``."""
    from mpitrain.comm.shards import CudaAwareShards, StagedShards
    from mpitrain.comm.threaded import ThreadShards

    if isinstance(transport, ThreadShards):
        return f"Thread({describe_shards(transport.inner)})"
    if isinstance(transport, StagedShards):
        return f"Staged({describe_shards(transport.inner)})"
    if isinstance(transport, CudaAwareShards):
        return f"CudaAware({describe_shards(transport.inner)})"
    return type(transport).__name__
