"""Lightning's collectives over MPI: reduce, all_gather (with gradients), broadcast, metrics.

These are what ``self.log(..., sync_dist=True)``, callbacks (``EarlyStopping``,
``ModelCheckpoint``) and torchmetrics call through the strategy. Tensors go to MPI as numpy
views of host memory (``mpitrain.comm``); device tensors are copied through the host (these
are small: logged scalars, decisions, metric states), so no CUDA-aware MPI is needed.
Every function here is a collective on ``comm``: each rank calls it in the same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.reduce_ops import buffer, mpi_op
from mpitrain.errors import ConfigError, with_hint

if TYPE_CHECKING:
    from mpi4py import MPI

#: Lightning / torch.distributed reduce-op names -> mpitrain.comm.reduce_ops names
_OPS = {"sum": "sum", "mean": "mean", "avg": "mean", "max": "max", "min": "min",
        "product": "product", "prod": "product"}


def op_name(reduce_op: Any) -> str:
    """Return ``sum|mean|max|min|product`` for a Lightning ``reduce_op`` (str or ReduceOp).

    Raises:
        ConfigError: an op MPI cannot apply here (bitwise ops, PREMUL_SUM), with the list.
    """
    raw = reduce_op if isinstance(reduce_op, str) else getattr(reduce_op, "name", reduce_op)
    name = _OPS.get(str(raw).lower()) if raw is not None else "mean"
    if name is None:
        raise ConfigError(with_hint(f"MPIStrategy.reduce: reduce_op {reduce_op!r} is not "
                                    "supported", "use 'mean', 'sum', 'max', 'min' or 'product'"))
    return name


def refuse_group(group: Any, what: str) -> None:
    """Raise when a caller passes a torch.distributed process group (there is none here)."""
    if group is not None:
        raise ConfigError(with_hint(
            f"MPIStrategy.{what}: process groups are torch.distributed's; this strategy "
            "communicates over the whole MPI world",
            f"call {what} without group= (sync_dist_group=None in self.log)"))


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host tensor holding ``t``'s values (``t`` itself when it already is one)."""
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        return t
    return t.to("cpu").contiguous()


def reduce_(t: torch.Tensor, comm: MPI.Intracomm, reduce_op: Any = "mean") -> torch.Tensor:
    """Collective: reduce ``t`` in place over ``comm`` and return it (Lightning's semantics).

    ``mean`` sums and divides by the world size; an integer tensor gets the true quotient
    cast back to its type, as Lightning's gloo path does.
    """
    name = op_name(reduce_op)
    if comm.size == 1:
        return t
    shared = t.device.type == "cpu" and t.is_contiguous()  # the host view is t's storage
    host = _host(t)
    from mpi4py import MPI

    op = mpi_op("sum" if name == "mean" else name, host.dtype)
    comm.Allreduce(MPI.IN_PLACE, buffer(host), op=op)
    with torch.no_grad():
        if not shared:
            t.copy_(host)
        if name == "mean":
            if torch.is_floating_point(t):
                t.div_(comm.size)
            else:
                t.copy_(t / comm.size)
    return t


def all_gather(t: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Collective: return every rank's ``t`` stacked, shape ``(world, *t.shape)`` (no grad).

    Every rank must pass a tensor of the same shape and dtype (as torch.distributed needs).
    """
    host = _host(t)
    out = torch.empty((comm.size, *host.shape), dtype=host.dtype)
    if host.numel():
        comm.Allgather(buffer(host), buffer(out))
    return out.to(t.device)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy of this rank's slot
    (the reduce-scatter of torch.distributed.nn.functional.all_gather)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, comm: Any) -> torch.Tensor:
        ctx.comm = comm
        return all_gather(t, comm)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        comm = ctx.comm
        total = _host(grads[0]).clone()
        reduce_(total, comm, "sum")
        return total[comm.rank].to(grads[0].device), None


def all_gather_with_grad(t: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Collective: :func:`all_gather` through which gradients flow (``sync_grads=True``);
    the backward pass is collective too."""
    out: torch.Tensor = _AllGatherWithGrad.apply(t, comm)  # type: ignore[no-untyped-call]
    return out


def broadcast_object(obj: Any, comm: MPI.Intracomm, src: int = 0) -> Any:
    """Collective: return rank ``src``'s ``obj`` on every rank (pickled)."""
    if comm.size == 1:
        return obj
    return comm.bcast(obj, root=src)


class MetricSync:
    """torchmetrics' ``dist_sync_fn``: gather a metric state from every rank over MPI.

    States may differ in length between ranks (``cat`` states), so they travel pickled;
    they are small. Set on each metric by :func:`route_metrics`.
    """

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm

    def __call__(self, t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        """Collective: return every rank's ``t`` (this rank's included), in rank order."""
        refuse_group(group, "metric sync")
        parts: list[torch.Tensor] = self.comm.allgather(_host(t).clone())
        return [p.to(t.device) for p in parts]

    def available(self) -> bool:
        """torchmetrics' ``distributed_available_fn``: sync when there are several ranks."""
        return bool(self.comm.size > 1)


def route_metrics(module: torch.nn.Module, comm: MPI.Intracomm) -> int:
    """Make every torchmetrics ``Metric`` inside ``module`` sync its state over ``comm``.

    torchmetrics syncs through torch.distributed by default, which this strategy does not
    start: without this each rank would report its own part. Returns the metrics routed.
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics comes with Lightning; a stripped install has none
        return 0
    sync = MetricSync(comm)
    count = 0
    for m in module.modules():
        if isinstance(m, Metric):
            m.dist_sync_fn = sync
            m.distributed_available_fn = sync.available
            count += 1
    return count
