"""Turn the ``nn.Linear`` layers of a standard transformer block into the column/row pattern.

``parallelize_(module, plan, comm)`` replaces each named ``nn.Linear`` by a
:class:`ColumnParallelLinear` or :class:`RowParallelLinear` holding this rank's slice of its
current weights, so a dense block (attention ``q, k, v -> o``, MLP ``fc1 -> fc2``) becomes
tensor-parallel in place, starting equal to the dense one. The module's own code keeps
working when it reads sizes from the tensors (its per-rank head count is ``heads / T``: set it
yourself, the helper cannot know the attribute). Separate q, k, v layers each all-reduce their
input gradient; fuse them into one column layer (``interleave=3``, as the built-in GPT does)
for one all-reduce per sub-block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mpitrain.parallel.tensor import ColumnParallelLinear, Init, RowParallelLinear

if TYPE_CHECKING:
    from mpi4py import MPI

STYLES = ("column", "row")


def _copier(src: torch.Tensor) -> Init:
    def init(t: torch.Tensor, gen: torch.Generator | None) -> None:
        with torch.no_grad():
            t.copy_(src)

    return init


def from_linear(
    linear: nn.Linear, comm: MPI.Intracomm, style: str, *, sequence_parallel: bool = False
) -> ColumnParallelLinear | RowParallelLinear:
    """Return the tensor-parallel layer holding this rank's slice of ``linear``'s weights."""
    bias = linear.bias is not None
    init = _copier(linear.weight.detach())
    bias_init = _copier(linear.bias.detach()) if linear.bias is not None else None
    if style == "column":
        return ColumnParallelLinear(linear.in_features, linear.out_features, comm, bias=bias,
                                    sequence_parallel=sequence_parallel, init=init,
                                    bias_init=bias_init)
    if style == "row":
        return RowParallelLinear(linear.in_features, linear.out_features, comm, bias=bias,
                                 sequence_parallel=sequence_parallel, init=init,
                                 bias_init=bias_init)
    raise ValueError(f"unknown tensor-parallel style {style!r}; use one of {', '.join(STYLES)}")


def parallelize_(
    module: nn.Module, plan: Mapping[str, str], comm: MPI.Intracomm, *,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Replace ``module``'s submodules named in ``plan`` (dotted path -> ``column``/``row``).

    Every tensor rank calls it on an identical module (same weights); no communication.
    Raises ValueError naming a path that is missing or not an ``nn.Linear``.
    """
    for path, style in plan.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = module.get_submodule(parent_path) if parent_path else module
            child = getattr(parent, name)
        except AttributeError:
            raise ValueError(f"tensor-parallel plan names '{path}', which the module lacks; "
                             "use the names of module.named_modules()") from None
        if not isinstance(child, nn.Linear):
            raise ValueError(f"tensor-parallel plan names '{path}', a {type(child).__name__}, "
                             "not an nn.Linear")
        setattr(parent, name, from_linear(child, comm, style, sequence_parallel=sequence_parallel))
    return module
