"""Point-to-point transfer of activations and their gradients between pipeline stages.

The first message on each link carries the tensor's shape and dtype (agreed once); after
that, only raw buffers travel: ``Isend`` (the caller keeps the handle) and a blocking
``Recv`` into a fresh tensor. MPI keeps messages of one (source, tag) in order, so
micro-batches arrive in the order they were sent. Device tensors are staged through host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.allreduce import numpy_view
from mpitrain.errors import CommError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

TAG_FORWARD, TAG_BACKWARD, TAG_SHAPE = 31, 32, 33


class StageLink:
    """This stage's links to its neighbours on ``pp_comm`` (stage index = rank there)."""

    def __init__(
        self, pp_comm: MPI.Intracomm, device: torch.device, *, fixed_shapes: bool = True
    ) -> None:
        self.comm = pp_comm
        self.fixed = fixed_shapes  # False: a header before every tensor (evaluation)
        self.device = device
        self.stage = pp_comm.rank
        self.stages = pp_comm.size
        self._shapes: dict[tuple[int, int], tuple[tuple[int, ...], torch.dtype]] = {}
        self._pending: list[tuple[MPI.Request, Any]] = []

    def _send(self, t: torch.Tensor, dest: int, tag: int) -> None:
        key = (dest, tag)
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
        self._pending.append((self.comm.Isend(buf, dest=dest, tag=tag), (host, buf)))

    def _recv(self, source: int, tag: int) -> torch.Tensor:
        key = (source, tag)
        if key not in self._shapes or not self.fixed:
            shape, dtype = self.comm.recv(source=source, tag=TAG_SHAPE + tag)
            self._shapes[key] = (tuple(shape), getattr(torch, dtype.split(".")[-1]))
        shape, dt = self._shapes[key]
        out = torch.empty(shape, dtype=dt)
        self.comm.Recv(numpy_view(out), source=source, tag=tag)
        return out.to(self.device)

    def send_forward(self, t: torch.Tensor) -> None:
        """Send an activation to the next stage (non-blocking)."""
        self._send(t, self.stage + 1, TAG_FORWARD)

    def recv_forward(self) -> torch.Tensor:
        """Receive the next activation from the previous stage."""
        return self._recv(self.stage - 1, TAG_FORWARD)

    def send_backward(self, t: torch.Tensor) -> None:
        """Send an input gradient to the previous stage (non-blocking)."""
        self._send(t, self.stage - 1, TAG_BACKWARD)

    def recv_backward(self) -> torch.Tensor:
        """Receive the next output gradient from the following stage."""
        return self._recv(self.stage + 1, TAG_BACKWARD)

    def wait_sends(self) -> None:
        """Wait for every send this stage started."""
        from mpi4py import MPI

        if self._pending:
            MPI.Request.Waitall([r for r, _ in self._pending])
        self._pending.clear()
