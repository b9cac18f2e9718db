"""Transports for sharded state (ZeRO): reduce-scatter and all-gather, flat or hierarchical.

A :class:`ShardComm` moves flat buffers of ``size * chunk`` elements whose chunk ``r``
belongs to rank ``r`` of the communicator:

- ``ireduce_scatter_(send, out)``: rank ``r`` receives the sum (average) of every rank's chunk
  ``r`` (``out=None``: into ``send[:chunk]``);
- ``iallgather_(full)``: every chunk of ``full`` receives its owner's values, in place.

Implementations, mirroring the all-reduce reducers (:mod:`mpitrain.comm.factory`):

- :class:`FlatShards`: one MPI call on the whole communicator. Host tensors go to MPI as
  numpy views (the all-gather by address, so a buffer whose storage is freed by resizing
  stays resizable); CUDA tensors go to MPI directly (CUDA-aware MPI) once their producing
  work is complete.
- :class:`HierarchicalShards`: a reduce-scatter inside each node (shared memory), then one
  among the ranks of the same local index across nodes, so each node sends ``(M-1)/M`` of
  the buffer over the network once instead of once per local rank; the all-gather runs the
  reverse. Chunks are permuted into (local index, node) order first, so the result is
  exactly the flat one's, for any rank placement with the same number of ranks per node.
- :class:`StagedShards`: device buffers copied through reused host buffers to a host
  transport (any MPI); on host tensors (forced staging) the same code with plain copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from mpitrain.comm import allreduce as _ar
from mpitrain.comm.cuda_aware import mpi_buffer, wait_producer
from mpitrain.comm.handle import DONE, ChainedHandle, Handle, RequestHandle
from mpitrain.comm.reduce_scatter import check_chunk, ireduce_scatter_block_, trivial
from mpitrain.comm.staged import BufferPool, CopyEngine, CudaCopies, HostCopies
from mpitrain.comm.stages import StageQueue
from mpitrain.comm.stages import call as _call
from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime.ulfm import derived

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.runtime.world import World


class ShardComm(Protocol):
    """Reduce-scatter / all-gather of flat buffers split into one chunk per rank."""

    @property
    def size(self) -> int:
        """Number of ranks (and chunks)."""

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: start reducing ``send``; this rank's chunk lands in ``out``."""

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: start filling every chunk of ``full`` from its owner, in place."""

    def free(self) -> None:
        """Collective: release the communicators (nothing may be in flight)."""


def bytes_spec(t: torch.Tensor) -> list[object]:
    """An MPI.BYTE buffer spec of ``t`` (host: by address, which keeps the storage resizable;
    CUDA: the tensor itself, for CUDA-aware MPI)."""
    from mpi4py import MPI

    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu":
        return [MPI.buffer.fromaddress(t.data_ptr(), nbytes), nbytes, MPI.BYTE]
    return [t.detach().view(torch.uint8), nbytes, MPI.BYTE]


class FlatShards:
    """One reduce-scatter / all-gather on the whole communicator (host or CUDA-aware)."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm

    @property
    def size(self) -> int:
        """Number of ranks."""
        return int(self.comm.size)

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: ``Ireduce_scatter_block`` (in place when ``out`` is None)."""
        return ireduce_scatter_block_(send, out, self.comm, average=average)

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: in-place ``Iallgather`` of the bytes of ``full``'s chunks."""
        from mpi4py import MPI

        size = self.size
        check_chunk(full, None, size, "all-gather")
        if size == 1 or full.numel() == 0:
            return DONE
        wait_producer(full)
        buf, nbytes, dt = bytes_spec(full)
        spec = [buf, int(nbytes) // size, dt]  # type: ignore[call-overload]
        return RequestHandle(self.comm.Iallgather(MPI.IN_PLACE, spec), keep=full)

    def free(self) -> None:
        """Collective: free the communicator."""
        self.comm.Free()


class HierarchicalShards:
    """Reduce-scatter inside the node, then across nodes (all-gather: the reverse).

    Build with :meth:`create`. Needs the same number of ranks on every node (else use
    :class:`FlatShards`; :func:`make_shard_comm` decides).
    """

    def __init__(
        self, comms: tuple[MPI.Intracomm, MPI.Intracomm, MPI.Intracomm, MPI.Intracomm],
        order: torch.Tensor, num_nodes: int, rank: int,
    ) -> None:
        self._node_rs, self._cross_rs, self._cross_ag, self._node_ag = comms
        #: ``order[k]``: the rank whose chunk sits at position k of the permuted buffer
        self.order = order
        self.num_nodes = num_nodes
        self._size = len(order)
        self._rank = rank
        self._queue = StageQueue()

    @classmethod
    def create(cls, world: World, comm_size: int) -> HierarchicalShards:
        """Collective over ``world.comm``: the node/cross communicators, one per stage."""
        local = world.comm.allgather((world.local_rank, world.cross_comm.rank))
        m = world.num_nodes
        pos = [lr * m + cr for lr, cr in local]
        if sorted(pos) != list(range(comm_size)):
            raise ConfigError(with_hint(
                "the hierarchical shard transport needs the same number of ranks on every node",
                "use algo='flat' (make_shard_comm falls back to it by itself)"))
        order = torch.empty(comm_size, dtype=torch.long)
        order[torch.tensor(pos)] = torch.arange(comm_size)
        comms = (derived(world.node_comm.Dup()), derived(world.cross_comm.Dup()),
                 derived(world.cross_comm.Dup()), derived(world.node_comm.Dup()))
        return cls(comms, order, m, world.comm.rank)

    @property
    def size(self) -> int:
        """Number of ranks (and chunks)."""
        return self._size

    def _permuted(self, t: torch.Tensor, chunk: int) -> torch.Tensor:
        """``t``'s chunks in (local index, node) order (a new buffer)."""
        return t.view(self._size, chunk).index_select(0, self.order.to(t.device)).view(-1)

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: node reduce-scatter (M chunks each), then across nodes (one chunk)."""
        size = self._size
        chunk = check_chunk(send, out, size)
        target = send[:chunk] if out is None else out
        if trivial(send, out, size):
            return DONE
        work = self._permuted(send, chunk)
        wait_producer(work)
        mid = torch.empty(self.num_nodes * chunk, dtype=send.dtype, device=send.device)
        res = target if target.is_contiguous() else torch.empty_like(target)
        wbuf, op = mpi_buffer(work)
        mbuf, _ = mpi_buffer(mid)
        rbuf, _ = mpi_buffer(res)
        node, cross = self._node_rs, self._cross_rs

        def inside(nb: bool) -> MPI.Request | None:
            return _call(node, "Reduce_scatter_block", nb, wbuf, mbuf, op=op)

        def across(nb: bool) -> MPI.Request | None:
            return _call(cross, "Reduce_scatter_block", nb, mbuf, rbuf, op=op)

        def finish(_keep: object = (work, mid, res)) -> None:  # buffers live until here
            if res is not target:
                target.copy_(res)
            if average:
                _ar.average_(target, size)

        return self._queue.submit([inside, across], finish)

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: gather across nodes (M chunks), then inside the node; un-permute."""
        from mpi4py import MPI

        size = self._size
        chunk = check_chunk(full, None, size, "all-gather")
        if size == 1 or chunk == 0:
            return DONE
        m = self.num_nodes
        cross, node = self._cross_ag, self._node_ag
        # this node-column's chunks (one per node, in cross order), then the whole buffer
        col = torch.empty(m * chunk, dtype=full.dtype, device=full.device)
        c = cross.rank
        col[c * chunk : (c + 1) * chunk].copy_(full[self._rank * chunk : (self._rank + 1) * chunk])
        work = torch.empty_like(full)
        wait_producer(col)
        cbuf, cbytes, byte = bytes_spec(col)
        wbuf, _, _ = bytes_spec(work)
        per = int(cbytes)  # type: ignore[call-overload]

        def across(nb: bool) -> MPI.Request | None:
            return _call(cross, "Allgather", nb, MPI.IN_PLACE, [cbuf, per // m, byte])

        def inside(nb: bool) -> MPI.Request | None:
            return _call(node, "Allgather", nb, [cbuf, per, byte], [wbuf, per, byte])

        def finish(_keep: object = (col, work)) -> None:  # buffers live until here
            full.view(size, chunk).index_copy_(0, self.order.to(full.device),
                                               work.view(size, chunk))

        return self._queue.submit([across, inside], finish)

    def free(self) -> None:
        """Collective: free the four communicators (after every handle was waited)."""
        self._queue.drain()
        for c in (self._node_ag, self._cross_ag, self._cross_rs, self._node_rs):
            c.Free()


class StagedShards:
    """Device buffers staged through reused host buffers to a host :class:`ShardComm`."""

    def __init__(self, inner: ShardComm, *, pin: bool | None = None) -> None:
        self.inner = inner
        self.pool = BufferPool(pin=pin)
        self._copies: dict[str, CopyEngine] = {"cpu": HostCopies()}

    @property
    def size(self) -> int:
        """Number of ranks."""
        return self.inner.size

    def _engine(self, t: torch.Tensor) -> CopyEngine:
        key = str(t.device)
        if key not in self._copies:
            self._copies[key] = CudaCopies(t.device)
        return self._copies[key]

    def _to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, CopyEngine]:
        copies = self._engine(t)
        buf = self.pool.acquire(t.numel(), t.dtype)
        copies.host_wait(copies.to_host(t, buf, after=copies.ready(t)))
        return buf, copies

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: copy ``send`` to host, reduce-scatter there, copy the chunk back."""
        chunk = check_chunk(send, out, self.size)
        target = send[:chunk] if out is None else out
        buf, copies = self._to_host(send)
        inner = self.inner.ireduce_scatter_(buf, None, average=average)

        def finish() -> None:
            ev = copies.to_device(buf[:chunk], target)
            copies.compute_wait(target, ev)
            copies.host_wait(ev)  # before the host buffer is reused
            self.pool.release(buf)

        return ChainedHandle(inner, finish)

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: copy ``full`` to host, all-gather there, copy it back."""
        buf, copies = self._to_host(full)
        inner = self.inner.iallgather_(buf)

        def finish() -> None:
            ev = copies.to_device(buf, full)
            copies.compute_wait(full, ev)
            copies.host_wait(ev)
            self.pool.release(buf)

        return ChainedHandle(inner, finish)

    def free(self) -> None:
        """Collective: free the inner transport."""
        self.inner.free()


class CudaAwareShards:
    """Device buffers straight to a CUDA-aware MPI; reduce-scatters of float16/bfloat16 (which
    MPI cannot sum in device memory, see :func:`~mpitrain.comm.cuda_aware.device_reducible`)
    go through ``fallback`` (staged). All-gathers move bytes, so they always go direct."""

    def __init__(self, inner: ShardComm, fallback: ShardComm) -> None:
        self.inner = inner
        self.fallback = fallback

    @property
    def size(self) -> int:
        """Number of ranks."""
        return self.inner.size

    def ireduce_scatter_(
        self, send: torch.Tensor, out: torch.Tensor | None, *, average: bool
    ) -> Handle:
        """Collective: direct, or staged for dtypes MPI cannot sum on the device."""
        from mpitrain.comm.cuda_aware import device_reducible

        if send.device.type != "cpu" and not device_reducible(send.dtype):
            return self.fallback.ireduce_scatter_(send, out, average=average)
        return self.inner.ireduce_scatter_(send, out, average=average)

    def iallgather_(self, full: torch.Tensor) -> Handle:
        """Collective: direct."""
        return self.inner.iallgather_(full)

    def free(self) -> None:
        """Collective: free both."""
        self.inner.free()
        self.fallback.free()
