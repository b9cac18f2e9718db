"""Sparse gradients for ``hvd.DistributedOptimizer`` (``nn.Embedding(sparse=True)``).

The gradient engine keeps every gradient as a dense view into a bucket, so a sparse gradient
that autograd accumulates there turns dense — harmless for optimizers that take dense
gradients, fatal for ``torch.optim.SparseAdam``. The parameters of a ``SparseAdam`` therefore
stay outside the engine and are exchanged here at ``synchronize()``, as Horovod does: their
indices and values are all-gathered over the process set (``hvd.sparse_allreduce_async``), or,
with ``sparse_as_dense=True``, the gradient is densified, all-reduced and made sparse again
(keeping the gradient's sparse dimensions, so whole rows stay together).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mpitrain.horovod import context as _c
from mpitrain.horovod import ops as _o
from mpitrain.horovod.api import sparse_allreduce_async
from mpitrain.horovod.handles import Op


def needs_sparse(optimizer: torch.optim.Optimizer) -> bool:
    """Return whether ``optimizer`` steps on sparse gradients only (``SparseAdam``)."""
    return isinstance(optimizer, torch.optim.SparseAdam)


def _empty_sparse(p: torch.Tensor) -> torch.Tensor:
    """A sparse gradient with no rows (a parameter that got none this step)."""
    indices = torch.empty((1, 0), dtype=torch.long, device=p.device)
    values = p.new_empty((0, *p.shape[1:]))
    return torch.sparse_coo_tensor(indices, values, p.shape)


def _resparsify(op: Op, sparse_dim: int) -> Callable[[], torch.Tensor]:
    """Wait for a densified gradient's all-reduce, then make it sparse again."""

    def done() -> torch.Tensor:
        out: torch.Tensor = op.result()
        return out.to_sparse(sparse_dim)

    return done


class SparseGrads:
    """The gradients of the parameters outside the engine, exchanged as Horovod does.

    Args:
        named: ``(name, parameter)`` in the same order on every rank of the set.
        process_set: the set the gradients are averaged (or summed) over.
        op: ``hvd.Average`` or ``hvd.Sum``.
        sparse_as_dense: all-reduce densified gradients instead of all-gathering rows.
        prescale: factor before the reduction (``1 / gradient_predivide_factor``).
        postscale: factor after it (``gradient_predivide_factor``).
    """

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]],
                 process_set: _c.ProcessSet, op: int, sparse_as_dense: bool,
                 prescale: float = 1.0, postscale: float = 1.0) -> None:
        self.named = [(n, p) for n, p in named if p.requires_grad]
        self.process_set = process_set
        self.op = op
        self.sparse_as_dense = sparse_as_dense
        self.prescale = prescale
        self.postscale = postscale

    def zero_grad(self) -> None:
        """Drop the gradients (sparse gradients cannot be zeroed in place)."""
        for _, p in self.named:
            p.grad = None

    def exchange(self) -> None:
        """Collective over the set: replace each gradient by its average (or sum).

        Every gradient is started before the first is waited for, in parameter order.
        """
        if not self.process_set.included():  # a rank outside the set keeps its own
            return
        finish: list[tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]] = []
        for name, p in self.named:
            g = p.grad
            if self.sparse_as_dense:
                dense = p.new_zeros(p.shape) if g is None else g.to_dense().clone()
                op = _o.allreduce_op([dense], [dense], f"sparse_as_dense.{name}", self.op,
                                     self.prescale, self.postscale, self.process_set, False)
                dim = g.sparse_dim() if g is not None and g.is_sparse else 1
                finish.append((p, _resparsify(op, dim)))
            else:
                g = _empty_sparse(p) if g is None else g if g.is_sparse else g.to_sparse(1)
                finish.append((p, sparse_allreduce_async(g, f"sparse.{name}", self.op,
                                                         self.process_set)))
        for p, done in finish:
            p.grad = done()
