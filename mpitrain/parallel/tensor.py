"""Tensor-parallel layers (Megatron's column/row pattern) over an MPI communicator.

Each layer builds the full dense weight from ``init`` (the same on every rank when the
generators agree) and keeps its slice, so a tensor-parallel model starts equal to the dense
one. ``PARTITION`` names each parameter's split dimension (None: replicated), which the
checkpoint consolidation uses to put the slices back together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mpitrain.parallel.functional import (
    allreduce_sum,
    copy_to_tp,
    current_timeline,
    gather_from_tp,
    gather_sequence,
    record_since,
    reduce_from_tp,
    reduce_scatter_sequence,
)

if TYPE_CHECKING:
    from mpi4py import MPI

Init = Callable[[torch.Tensor, torch.Generator | None], None]


def default_init(t: torch.Tensor, gen: torch.Generator | None) -> None:
    """nn.Linear's default: uniform in +-1/sqrt(fan_in) (weights and biases alike)."""
    fan_in = t.shape[1] if t.dim() > 1 else t.shape[0]
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound, generator=gen)


def normal_init(std: float) -> Init:
    """Return an init that draws N(0, std^2) (GPT-2's 0.02)."""
    def init(t: torch.Tensor, gen: torch.Generator | None) -> None:
        nn.init.normal_(t, 0.0, std, generator=gen)

    return init


def _slice(full: torch.Tensor, comm: MPI.Intracomm, dim: int) -> nn.Parameter:
    part = full.chunk(comm.size, dim=dim)[comm.rank]
    return nn.Parameter(part.contiguous().clone())


def _linear(
    fan_in: int, fan_out: int, comm: MPI.Intracomm, dim: int, bias: bool, init: Init,
    bias_init: Init | None, gen: torch.Generator | None,
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Draw the full weight (and bias) and keep this rank's slice along ``dim``."""
    w = torch.empty(fan_out, fan_in)
    init(w, gen)
    if not bias:
        return _slice(w, comm, dim), None
    b = torch.empty(fan_out)
    (bias_init or _bias_like(init, fan_in))(b, gen)
    # a row-parallel bias is added after the reduction: replicated
    return _slice(w, comm, dim), _slice(b, comm, 0) if dim == 0 else nn.Parameter(b)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by output features: each rank computes its columns.

    Forward takes the full input (the all-reduce of its gradient is the backward's one
    collective) or, with ``sequence_parallel``, this rank's part of the sequence (all-gathered
    forward, reduce-scattered backward). The output stays split unless ``gather_output``.
    ``interleave`` k says the full weight is laid out as k blocks per rank (fused q/k/v:
    each rank's slice holds its part of each), which the consolidation undoes.
    """

    PARTITION: ClassVar[dict[str, int | None]] = {"weight": 0, "bias": 0}

    def __init__(
        self, in_features: int, out_features: int, comm: MPI.Intracomm, *, bias: bool = True,
        gather_output: bool = False, sequence_parallel: bool = False,
        init: Init = default_init, bias_init: Init | None = None,
        generator: torch.Generator | None = None, interleave: int = 1,
        gathered_input: bool = False,
    ) -> None:
        super().__init__()
        self.interleave = interleave
        #: the input is already the whole sequence, gathered by the module before (a
        #: ``sequence-norm`` of a plan, whose backward reduce-scatters): used as it is
        self.gathered_input = gathered_input
        if out_features % comm.size:
            raise ValueError(f"{out_features} output features do not split over {comm.size} ranks")
        self.comm, self.gather_output = comm, gather_output
        self.sequence_parallel = sequence_parallel
        self.weight, self.bias = _linear(in_features, out_features, comm, 0, bias, init,
                                         bias_init, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gathered_input:
            x = (gather_sequence(x, self.comm) if self.sequence_parallel
                 else copy_to_tp(x, self.comm))
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.comm) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by input features: partial sums reduced over ranks.

    Input is split along features (a column-parallel layer's output). The partial results
    are all-reduced, or reduce-scattered along the sequence with ``sequence_parallel``; the
    bias (replicated) is added after.
    """

    PARTITION: ClassVar[dict[str, int | None]] = {"weight": 1, "bias": None}

    def __init__(
        self, in_features: int, out_features: int, comm: MPI.Intracomm, *, bias: bool = True,
        sequence_parallel: bool = False, init: Init = default_init,
        bias_init: Init | None = None, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if in_features % comm.size:
            raise ValueError(f"{in_features} input features do not split over {comm.size} ranks")
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.weight, self.bias = _linear(in_features, out_features, comm, 1, bias, init,
                                         bias_init, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.comm)
        else:
            y = reduce_from_tp(y, self.comm)
        return y if self.bias is None else y + self.bias


def _bias_like(init: Init, fan_in: int) -> Init:
    if init is not default_init:
        def zeros(t: torch.Tensor, gen: torch.Generator | None) -> None:
            nn.init.zeros_(t)

        return zeros

    def uniform(t: torch.Tensor, gen: torch.Generator | None) -> None:
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(t, -bound, bound, generator=gen)

    return uniform


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split over ranks.

    Each rank looks up the tokens in its range, zeros the others, and the partial rows are
    summed over ranks (all-reduce, or reduce-scatter along the sequence).
    """

    PARTITION: ClassVar[dict[str, int | None]] = {"weight": 0}

    def __init__(
        self, num_embeddings: int, dim: int, comm: MPI.Intracomm, *,
        sequence_parallel: bool = False, init: Init | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings % comm.size:
            raise ValueError(f"vocabulary {num_embeddings} does not split over {comm.size} ranks")
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.per_rank = num_embeddings // comm.size
        self.start = comm.rank * self.per_rank
        w = torch.empty(num_embeddings, dim)
        (init or normal_init(1.0))(w, generator)
        self.weight = _slice(w, comm, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            out = F.embedding(tokens, self.weight)
            return out
        local = tokens - self.start
        outside = (local < 0) | (local >= self.per_rank)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(rows, self.comm)
        return reduce_from_tp(rows, self.comm)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, comm: MPI.Intracomm, start: int,
        ignore_index: int,
    ) -> torch.Tensor:
        from mpi4py import MPI

        from mpitrain.comm.allreduce import numpy_view

        tl = current_timeline()
        logits = logits.detach()
        lmax = logits.max(dim=-1).values
        t0 = tl.now() if tl.on else 0
        lmax = lmax.to("cpu", copy=True).contiguous()
        comm.Allreduce(MPI.IN_PLACE, numpy_view(lmax), op=MPI.MAX)
        if tl.on:
            record_since(tl, "tp all-reduce loss max", "allreduce",
                         lmax.numel() * lmax.element_size(), comm, t0)
        shifted = logits - lmax.to(logits.device).unsqueeze(-1)
        exp = shifted.exp()
        local = target - start
        inside = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
        sums = allreduce_sum(torch.stack([exp.sum(-1), picked]), comm, tl=tl,
                             name="tp all-reduce loss sums")
        keep = (target != ignore_index).to(logits.dtype)
        ctx.save_for_backward(exp.div_(sums[0].unsqueeze(-1)), idx, inside, keep)
        return (sums[0].log() - sums[1]) * keep

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, idx, inside, keep = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * (g * keep).unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, comm: MPI.Intracomm, start: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Collective: per-token cross-entropy of logits split over ``comm`` along the vocabulary.

    ``logits`` (..., V/T) holds this rank's vocabulary slice beginning at ``start``;
    ``target`` (...) the global token ids. Returns the per-token losses (...), the same on
    every rank; the gradient stays split (no logits are gathered). Tokens equal to
    ``ignore_index`` (padding) have loss 0 and no gradient, as in ``F.cross_entropy``;
    average over the others yourself.
    """
    if comm.size == 1:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
            ignore_index=ignore_index,
        ).view(target.shape)
    return _VocabParallelCE.apply(logits, target, comm, start, ignore_index)  # type: ignore[no-any-return,no-untyped-call]


def sequence_parallel_grads_(params: list[nn.Parameter], comm: MPI.Intracomm) -> None:
    """Collective: sum over ``comm`` the gradients of replicated parameters that each rank
    computed on its part of the sequence (LayerNorms, biases under sequence parallelism);
    recorded as ``tp all-reduce sequence-parallel grads`` inside ``recording(tl)``."""
    tl = current_timeline()
    for p in params:
        if p.grad is not None:
            p.grad.copy_(allreduce_sum(p.grad, comm, tl=tl,
                                       name="tp all-reduce sequence-parallel grads"))


ParallelLayer = ColumnParallelLinear | RowParallelLinear | VocabParallelEmbedding


def parallel_layers() -> tuple[type[nn.Module], ...]:
    """The layer classes with a ``PARTITION`` table."""
    return (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def replicated_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``module``'s parameters no tensor-parallel layer splits (norms, row-layer biases,
    position tables): under sequence parallelism each rank's gradient is a partial sum."""
    split = {id(p) for m in module.modules() if isinstance(m, parallel_layers())
             for name, p in m.named_parameters(recurse=False)
             if type(m).PARTITION.get(name) is not None}  # type: ignore[attr-defined]
    return [p for p in module.parameters() if id(p) not in split]


def merge_rules(module: nn.Module, drop: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Each parameter's ``[split dim or None, interleave, dropped]`` for the consolidation.

    Parameters outside the parallel layers are replicated (None); names starting with one of
    ``drop`` are copies of another stage's parameter (a tied head) and are left out.
    """
    rules: dict[str, list[Any]] = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            dim, k = None, 1
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                dim = m.PARTITION.get(pname)
                k = m.interleave if isinstance(m, ColumnParallelLinear) else 1
            rules[name] = [dim, k, name.startswith(drop)]
    return rules
