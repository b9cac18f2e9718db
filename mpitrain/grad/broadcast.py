"""Make every rank start identical: parameters, buffers and optimizer state from a root."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.broadcast import broadcast_tensors_
from mpitrain.grad.consistency import check_same_layout, layout

if TYPE_CHECKING:
    from mpi4py import MPI

Params = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def named_tensors(params: Params) -> list[tuple[str, torch.Tensor]]:
    """Return (name, tensor) pairs: a module's parameters then buffers, or the given pairs."""
    if isinstance(params, torch.nn.Module):
        return [*params.named_parameters(), *params.named_buffers()]
    if isinstance(params, Mapping):
        return list(params.items())
    return list(params)


def broadcast_parameters(params: Params, comm: MPI.Intracomm, root: int = 0) -> None:
    """Collective: overwrite parameters and buffers in place with ``root``'s values.

    Accepts a module, a ``state_dict()`` or ``named_parameters()``. Layouts are checked first
    so a mismatch raises the same CommError on every rank instead of corrupting memory.
    """
    pairs = named_tensors(params)
    check_same_layout(comm, layout(pairs), "parameter")
    with torch.no_grad():
        broadcast_tensors_([t for _, t in pairs], comm, root)


def broadcast_object(obj: Any, comm: MPI.Intracomm, root: int = 0) -> Any:
    """Collective: return ``root``'s picklable ``obj`` on every rank."""
    return comm.bcast(obj if comm.rank == root else None, root=root)


def initialize_optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
) -> bool:
    """Give a fresh optimizer its state as Horovod does: one local step on zero gradients.

    Not a collective (no communication); call it on every rank. Returns False (and changes
    nothing) when the optimizer already has state. Like Horovod, the step is real: weight
    decay shrinks the parameters, momentum buffers are created and Adam's step count becomes
    1. Gradients are zeroed in place where they exist (a ``DistributedOptimizer``'s alias its
    buckets); parameters of ``model``'s sparse embeddings get sparse zero gradients. LBFGS is
    left as it is.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # DistributedOptimizer wraps one
    if isinstance(inner, torch.optim.LBFGS) or len(inner.state_dict()["state"]) > 0:
        return False  # LBFGS needs a closure (Horovod refuses it; its state is broadcast as is)
    sparse: set[int] = set()
    if model is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding) and m.sparse:
                sparse.update(id(p) for p in m.parameters())
    for group in inner.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) in sparse:
                p.grad = torch.zeros_like(p).to_sparse()
            elif p.grad is not None and not p.grad.is_sparse:
                p.grad.zero_()
            else:
                p.grad = torch.zeros_like(p)
    inner.step()  # the wrapped optimizer: no gradient exchange, no collective
    return True


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, comm: MPI.Intracomm, root: int = 0
) -> None:
    """Collective: load ``root``'s optimizer state (moments and param-group hyperparameters
    such as ``lr``, ``momentum``, ``weight_decay``) into every rank's optimizer.

    Loads into the wrapped optimizer of a ``DistributedOptimizer`` (the wrapper forwards to
    it). A fresh optimizer stays fresh (no step is taken; ``mpitrain.horovod``'s version takes
    Horovod's zero-gradient step, see :func:`initialize_optimizer_state`).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # DistributedOptimizer wraps one
    state = broadcast_object(inner.state_dict() if comm.rank == root else None, comm, root)
    if comm.rank != root:
        inner.load_state_dict(state)
