"""Point-to-point transfer of activations and their gradients between pipeline stages.

The first message on each link carries the tensor's shape and dtype (agreed once); after
that, only raw buffers travel: ``Isend`` (the caller keeps the handle) and a blocking
``Recv`` into a fresh tensor. MPI keeps messages of one (source, tag) in order, so
micro-batches arrive in the order they were sent. Device tensors are staged through host.

With several model chunks per rank (the interleaved schedule) each chunk's traffic has its
own tags (``tag + CHUNK_TAGS * chunk``, chunk of the sender), so two chunks' messages
between the same ranks are never confused; the last rank's chunk ``c`` sends forward to rank
0's chunk ``c + 1`` (and rank 0's chunk ``c + 1`` its gradients back).

While ``timeline`` records, each send is a named flight (``send activation to stage 1``, op
``send``) from its start to observed completion: it is tested right after the start and at
this link's next send or receive, and waited in :meth:`StageLink.wait_sends`; each receive
is a blocking one (``recv gradient from stage 1``, op ``recv``). Both carry the tensor's bytes
and ``args`` ``group == "pipeline"``, ``peer`` (the other stage) and ``stage`` (this one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allreduce import numpy_view
from mpitrain.comm.handle import Handle, RequestHandle
from mpitrain.errors import CommError, with_hint
from mpitrain.grad.recorded import RecordedHandle
from mpitrain.timeline.recorder import NULL, Timeline
from mpitrain.timeline.stages import PIPELINE

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.runtime.comm_thread import CommThread

TAG_FORWARD, TAG_BACKWARD, TAG_SHAPE = 31, 32, 33
#: what travels under each tag (the flights' names)
WHAT = {TAG_FORWARD: "activation", TAG_BACKWARD: "gradient"}
#: chunk ``c``'s tags are the chunk 0 tags + ``CHUNK_TAGS * c`` (shape headers included)
CHUNK_TAGS = 100


class StageLink:
    """This stage's links to its neighbours on ``pp_comm`` (stage index = rank there)."""

    def __init__(
        self, pp_comm: MPI.Intracomm, device: torch.device, *, fixed_shapes: bool = True,
        thread: CommThread | None = None,
    ) -> None:
        self.comm = pp_comm
        #: the sends run, blocking, on this communication thread (``--comm-progress thread``)
        self.thread = thread
        self._sent: list[tuple[Handle, Any]] = []  # the thread's sends not yet waited on
        self.fixed = fixed_shapes  # False: a header before every tensor (evaluation)
        self.device = device
        self.stage = pp_comm.rank
        self.stages = pp_comm.size
        self._shapes: dict[tuple[int, int], tuple[tuple[int, ...], torch.dtype]] = {}
        self._pending: list[tuple[MPI.Request, Any]] = []
        #: records the sends and receives (set by the pipeline engine)
        self.timeline: Timeline = NULL
        self._flights: list[RecordedHandle] = []  # recorded sends not yet seen complete

    def _args(self, peer: int) -> dict[str, Any]:
        return {"group": PIPELINE, "peer": peer, "stage": self.stage}

    def _poll(self) -> None:
        """Close the recorded sends that completed (while recording)."""
        self._flights = [h for h in self._flights if not h.test()]

    def _send(self, t: torch.Tensor, dest: int, tag: int) -> None:
        key = (dest, tag)
        tl = self.timeline
        t0 = tl.now() if tl.on else 0
        host = t.detach().to("cpu").contiguous()
        if key not in self._shapes or not self.fixed:
            self._shapes[key] = (tuple(host.shape), host.dtype)
            self.comm.send((tuple(host.shape), str(host.dtype)), dest=dest, tag=TAG_SHAPE + tag)
        elif self._shapes[key] != (tuple(host.shape), host.dtype):
            raise CommError(
                with_hint(
                    f"stage {self.stage}: tensor to stage {dest} changed from "
                    f"{self._shapes[key]} to {(tuple(host.shape), host.dtype)}",
                    "every micro-batch must have the same shape (drop the last partial batch)",
                )
            )
        buf = numpy_view(host)
        handle: Handle
        if self.thread is not None:  # moves while this thread computes the next micro-batch
            handle = self.thread.submit(lambda: self.comm.Send(buf, dest=dest, tag=tag),
                                        f"send {WHAT[tag % CHUNK_TAGS]} to stage {dest}")
            self._sent.append((handle, (host, buf)))
        else:
            request = self.comm.Isend(buf, dest=dest, tag=tag)
            self._pending.append((request, (host, buf)))
            handle = RequestHandle(request)
        if tl.on:
            flight = tl.comm_started(f"send {WHAT[tag % CHUNK_TAGS]} to stage {dest}",
                                     host.numel() * host.element_size(), t0, "send",
                                     self._args(dest))
            self._flights.append(RecordedHandle(handle, tl, flight))
            self._poll()

    def _recv(self, source: int, tag: int) -> torch.Tensor:
        key = (source, tag)
        tl = self.timeline
        if tl.on:
            self._poll()
        t0 = tl.now() if tl.on else 0
        if key not in self._shapes or not self.fixed:
            shape, dtype = self.comm.recv(source=source, tag=TAG_SHAPE + tag)
            self._shapes[key] = (tuple(shape), getattr(torch, dtype.split(".")[-1]))
        shape, dt = self._shapes[key]
        out = torch.empty(shape, dtype=dt)
        self.comm.Recv(numpy_view(out), source=source, tag=tag)
        got = out.to(self.device)
        if tl.on:
            tl.comm_blocking(f"recv {WHAT[tag % CHUNK_TAGS]} from stage {source}",
                             out.numel() * out.element_size(), t0, "recv", self._args(source))
        return got

    def send_forward(self, t: torch.Tensor, chunk: int = 0) -> None:
        """Send chunk ``chunk``'s activation to the next global stage (non-blocking): the next
        rank, or the first rank's next chunk from the last rank."""
        self._send(t, (self.stage + 1) % self.stages, TAG_FORWARD + CHUNK_TAGS * chunk)

    def recv_forward(self, chunk: int = 0) -> torch.Tensor:
        """Receive chunk ``chunk``'s next activation from the previous global stage."""
        sender = chunk - 1 if self.stage == 0 else chunk
        return self._recv((self.stage - 1) % self.stages, TAG_FORWARD + CHUNK_TAGS * sender)

    def send_backward(self, t: torch.Tensor, chunk: int = 0) -> None:
        """Send chunk ``chunk``'s input gradient to the previous global stage (non-blocking)."""
        self._send(t, (self.stage - 1) % self.stages, TAG_BACKWARD + CHUNK_TAGS * chunk)

    def recv_backward(self, chunk: int = 0) -> torch.Tensor:
        """Receive chunk ``chunk``'s next output gradient from the following global stage."""
        sender = chunk + 1 if self.stage == self.stages - 1 else chunk
        return self._recv((self.stage + 1) % self.stages, TAG_BACKWARD + CHUNK_TAGS * sender)

    def wait_sends(self) -> None:
        """Wait for every send this stage started (the recorded ones: their waits recorded)."""
        from mpi4py import MPI

        for h in self._flights:
            h.wait()
        self._flights.clear()
        if self._pending:
            MPI.Request.Waitall([r for r, _ in self._pending])
        self._pending.clear()
        for sent, _keep in self._sent:
            sent.wait()
        self._sent.clear()
