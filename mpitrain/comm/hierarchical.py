"""Hierarchical all-reduce: inside each node over shared memory, across nodes among few ranks.

Two variants, both as three chained non-blocking stages progressed by the handle:

- ``reduce_bcast``: Ireduce to the node leader, Iallreduce among leaders, Ibcast in the node;
- ``rs_ag``: Ireduce_scatter_block in the node (each local rank owns 1/L of the tensor),
  Iallreduce of that chunk among same-local-rank peers of all nodes (all ranks use the
  network at once), Iallgather in the node.

Every stage runs on its own duplicated communicator and stages are started in the order the
operations were started (FIFO), so every communicator sees the same sequence of collectives on
every rank however the caller interleaves ``wait()`` and ``test()``. Buffers are handed to
mpi4py as numpy views on the host and as the tensor itself (``__cuda_array_interface__``/DLPack)
on a CUDA device, so the same reducer serves the host and the CUDA-aware paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mpitrain.comm.cuda_aware import average_, mpi_buffer, wait_producer
from mpitrain.comm.handle import DONE, Handle, MultiHandle
from mpitrain.comm.stages import Stage, StageQueue
from mpitrain.comm.stages import call as _call
from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.runtime.world import World

VARIANTS = ("reduce_bcast", "rs_ag", "auto")
#: in ``auto``, tensors of at least this many bytes use rs_ag (docs/gpu.md, measured)
RS_AG_MIN_BYTES = 64 << 10
#: larger tensors are cut into pieces of this size, queued one after another, so one piece's
#: cross-node stage runs while the next one's intra-node stage does (docs/cluster.md)
PIPELINE_BYTES = 1 << 20

class HierarchicalReducer:
    """Reducer over a :class:`World`'s node and cross-node communicators; build with create()."""

    def __init__(
        self,
        world: World,
        comms: tuple[MPI.Intracomm, MPI.Intracomm, MPI.Intracomm],
        *,
        variant: str,
        uniform_nodes: bool,
        max_local_size: int = 2,
        rs_ag_min_bytes: int = RS_AG_MIN_BYTES,
        overlap: bool = True,
        pipeline_bytes: int = PIPELINE_BYTES,
    ) -> None:
        self.world = world
        self.overlap = overlap
        self._node, self._cross, self._node2 = comms
        self.variant = variant
        self.uniform_nodes = uniform_nodes
        self.max_local_size = max_local_size  # the same on every rank (unlike _node.size)
        self.rs_ag_min_bytes = rs_ag_min_bytes
        self.pipeline_bytes = pipeline_bytes
        self._queue = StageQueue()

    @classmethod
    def create(
        cls,
        world: World,
        *,
        variant: str = "auto",
        rs_ag_min_bytes: int = RS_AG_MIN_BYTES,
        overlap: bool = True,
        pipeline_bytes: int = PIPELINE_BYTES,
    ) -> HierarchicalReducer:
        """Collective: duplicate the world's node/cross communicators (one per stage).

        ``overlap=False`` makes :meth:`iallreduce_` use blocking MPI calls (returns a completed
        handle), as FlatReducer does for MPIs whose non-blocking collectives are slow.
        """
        from mpi4py import MPI

        if variant not in VARIANTS:
            raise ConfigError(
                with_hint(f"hierarchical variant {variant!r} is unknown", f"use one of {VARIANTS}")
            )
        lo = world.comm.allreduce(world.local_size, op=MPI.MIN)
        hi = world.comm.allreduce(world.local_size, op=MPI.MAX)
        comms = (derived(world.node_comm.Dup()), derived(world.cross_comm.Dup()),
                 derived(world.node_comm.Dup()))
        return cls(
            world,
            comms,
            variant=variant,
            uniform_nodes=lo == hi,
            max_local_size=int(hi),
            rs_ag_min_bytes=rs_ag_min_bytes,
            overlap=overlap,
            pipeline_bytes=pipeline_bytes,
        )

    @property
    def size(self) -> int:
        """Number of ranks the reduction spans (the whole world)."""
        return self.world.size

    def free(self) -> None:
        """Collective: free the duplicated communicators (after every handle was waited)."""
        for c in (self._node2, self._cross, self._node):
            c.Free()

    def variant_for(self, t: torch.Tensor) -> str:
        """The variant used for ``t`` (rs_ag needs the same number of ranks on every node)."""
        v = self.variant
        if v == "auto":
            big = t.numel() * t.element_size() >= self.rs_ag_min_bytes
            v = "rs_ag" if big and self._node.size > 1 else "reduce_bcast"
        if v == "rs_ag" and not self.uniform_nodes:
            v = "reduce_bcast"
        return v

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an in-place sum/average of contiguous ``t`` across the world."""
        if not t.is_contiguous():
            raise ValueError("in-place collectives need a contiguous tensor; call .contiguous()")
        if self.world.size == 1 or t.numel() == 0:
            return DONE
        if not self.overlap:
            self.allreduce_(t, average=average)
            return DONE
        pieces = self._pieces(t)
        if len(pieces) == 1:
            return self._queue.submit(*self._op(t, average))
        return MultiHandle([self._queue.submit(*self._op(p, average)) for p in pieces])

    def _pieces(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (flat) cut into pipeline pieces when both stages have work, else ``[t]``.

        Decided from facts every rank shares (nodes, the largest node), never from this
        node's own size: ranks cutting different numbers of pieces would mismatch collectives.
        """
        step = max(1, self.pipeline_bytes // t.element_size())
        if self.world.num_nodes == 1 or self.max_local_size == 1 or t.numel() <= 2 * step:
            return [t]
        flat = t.view(-1)
        return [flat[i : i + step] for i in range(0, flat.numel(), step)]

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: in-place sum/average of ``t`` with blocking MPI calls.

        Operations still in flight finish first, so every communicator keeps its order.
        """
        if not t.is_contiguous():
            raise ValueError("in-place collectives need a contiguous tensor; call .contiguous()")
        if self.world.size == 1 or t.numel() == 0:
            return
        pieces = self._pieces(t) if self.overlap else [t]
        if len(pieces) > 1:  # pipelined: non-blocking pieces, waited here
            MultiHandle([self._queue.submit(*self._op(p, average)) for p in pieces]).wait()
            return
        self._queue.run_blocking(*self._op(t, average))

    def _op(self, t: torch.Tensor, average: bool) -> tuple[list[Stage], Callable[[], None]]:
        flat = t.view(-1)
        if self.variant_for(t) == "rs_ag":
            stages, after = self._rs_ag(flat)
        else:
            stages, after = self._reduce_bcast(flat)
        n = self.world.size

        def finish() -> None:
            after()
            if average:
                average_(t, n)

        return stages, finish

    # ------------------------------------------------------------------ variants

    def _reduce_bcast(self, t: torch.Tensor) -> tuple[list[Stage], Callable[[], None]]:
        from mpi4py import MPI

        buf, op = mpi_buffer(t)
        node, cross, node2 = self._node, self._cross, self._node2
        leader = node.rank == 0

        def reduce(nb: bool) -> MPI.Request | None:
            if node.size == 1:
                return None
            if leader:
                return _call(node, "Reduce", nb, MPI.IN_PLACE, buf, op=op, root=0)
            return _call(node, "Reduce", nb, buf, None, op=op, root=0)

        def across(nb: bool) -> MPI.Request | None:
            if not leader or cross.size == 1:
                return None
            return _call(cross, "Allreduce", nb, MPI.IN_PLACE, buf, op=op)

        def bcast(nb: bool) -> MPI.Request | None:
            return None if node2.size == 1 else _call(node2, "Bcast", nb, buf, root=0)

        return [reduce, across, bcast], lambda: None

    def _rs_ag(self, t: torch.Tensor) -> tuple[list[Stage], Callable[[], None]]:
        from mpi4py import MPI

        node, cross, node2 = self._node, self._cross, self._node2
        n, parts = t.numel(), node.size
        chunk = -(-n // parts)
        work = (
            t if chunk * parts == n else torch.zeros(chunk * parts, dtype=t.dtype, device=t.device)
        )
        if work is not t:
            work[:n].copy_(t)
            wait_producer(work)  # MPI reads device memory outside the stream
        mine = torch.empty(chunk, dtype=t.dtype, device=t.device)
        wbuf, op = mpi_buffer(work)
        mbuf, _ = mpi_buffer(mine)

        def scatter(nb: bool) -> MPI.Request | None:
            return _call(node, "Reduce_scatter_block", nb, wbuf, mbuf, op=op)

        def across(nb: bool) -> MPI.Request | None:
            if cross.size == 1:
                return None
            return _call(cross, "Allreduce", nb, MPI.IN_PLACE, mbuf, op=op)

        def gather(nb: bool) -> MPI.Request | None:
            return _call(node2, "Allgather", nb, mbuf, wbuf)

        def after() -> None:
            if work is not t:
                t.copy_(work[:n])

        return [scatter, across, gather], after
