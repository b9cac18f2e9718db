"""Turn the ``nn.Linear`` layers of a standard transformer block into the column/row pattern.

``parallelize_(module, plan, comm)`` replaces each named ``nn.Linear`` by a
:class:`ColumnParallelLinear` or :class:`RowParallelLinear` holding this rank's slice of its
current weights, so a dense block (attention ``q, k, v -> o``, MLP ``fc1 -> fc2``) becomes
tensor-parallel in place, starting equal to the dense one. The module's own code keeps
working when it reads sizes from the tensors (its per-rank head count is ``heads / T``: set it
yourself, the helper cannot know the attribute). A fused ``[q; k; v]`` projection takes style
``column-qkv`` (each rank keeps its heads of all three, one backward all-reduce per attention
sub-block, as the built-in GPT); separate q, k, v layers each all-reduce their input gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mpitrain.parallel.tensor import ColumnParallelLinear, Init, RowParallelLinear

if TYPE_CHECKING:
    from mpi4py import MPI

#: plan styles: a column layer, a row layer, and a fused [q; k; v] input projection whose
#: rows are three equal blocks (each split by heads: one backward all-reduce for all three)
STYLES = ("column", "row", "column-qkv")


def _interleaved(src: torch.Tensor, blocks: int, ranks: int) -> torch.Tensor:
    """Lay ``blocks`` equal row blocks out so each rank's chunk holds its part of every block."""
    parts = src.chunk(blocks)
    return torch.cat([torch.cat([b.chunk(ranks)[r] for b in parts]) for r in range(ranks)])


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
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    k = 3 if style == "column-qkv" else 1
    if k > 1:
        if linear.out_features % (k * comm.size):
            raise ValueError(f"fused projection of {linear.out_features} rows does not split "
                             f"into {k} blocks over {comm.size} ranks")
        w = _interleaved(w, k, comm.size)
        b = _interleaved(b, k, comm.size) if b is not None else None
    init = _copier(w)
    bias_init = _copier(b) if b is not None else None
    if style in ("column", "column-qkv"):
        return ColumnParallelLinear(linear.in_features, linear.out_features, comm, bias=bias,
                                    sequence_parallel=sequence_parallel, init=init,
                                    bias_init=bias_init, interleave=k)
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
