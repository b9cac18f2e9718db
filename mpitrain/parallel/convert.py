"""Tensor-parallel plans: module-name patterns -> column / row / fused-qkv / vocabulary layers.

``parallelize_(module, plan, comm)`` replaces each module a plan names by a
:class:`ColumnParallelLinear`, :class:`RowParallelLinear` or :class:`VocabParallelEmbedding`
holding this rank's slice of its current weights, so a dense model (attention ``q, k, v -> o``,
MLP ``fc1 -> fc2``, embedding and head) becomes tensor-parallel in place, starting equal to the
dense one. A plan (:class:`TensorPlan`) maps patterns of ``named_modules()`` names (``*`` per
dotted component)
to styles and lists the attributes to divide by the tensor size (a head count the model's code
reads); :func:`check_plan` refuses, on the dense model, a pattern that matches nothing, a module
of the wrong kind or a width that does not divide. ``nn.Linear`` and ``nn.Embedding`` are known;
other linear-like layers (Hugging Face's ``Conv1D``) are taught with :func:`register_linear`.

Styles: ``column`` (output features split), ``row`` (input features split, partial sums
reduced), ``column-qkv`` (a fused ``[q; k; v]`` projection: each rank keeps its heads of all
three), ``embedding`` (vocabulary rows split, partial rows summed) and ``head`` (an output
projection over the vocabulary, split by vocabulary rows: feed its logits to
:func:`~mpitrain.parallel.tensor.vocab_parallel_cross_entropy`) and ``sequence-norm`` (a norm
in front of column layers, as torch's ``SequenceParallel``: with ``sequence_parallel`` it runs
on this rank's part of the sequence and its output is all-gathered, the column layers after it
taking the whole sequence as it is and the row layers reduce-scattering theirs, so a module
that reads its input's length, as Hugging Face attention does, sees the whole sequence;
without, nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpitrain.parallel.functional import gather_sequence
from mpitrain.parallel.tensor import (
    ColumnParallelLinear,
    Init,
    RowParallelLinear,
    VocabParallelEmbedding,
)

if TYPE_CHECKING:
    from mpi4py import MPI

STYLES = ("column", "row", "column-qkv", "embedding", "head", "sequence-norm")

#: a linear-like layer's weights as ``nn.Linear`` holds them: (weight (out, in), bias or None)
Dense = tuple[torch.Tensor, torch.Tensor | None]
#: layer class -> how to read its weights in ``nn.Linear``'s layout (see register_linear)
LINEAR_KINDS: dict[type[nn.Module], Callable[[Any], Dense]] = {
    nn.Linear: lambda m: (m.weight, m.bias),
}


def register_linear(cls: type[nn.Module], weights: Callable[[Any], Dense]) -> None:
    """Teach the plans a linear-like layer class: ``weights(layer)`` returns its
    ``(weight (out, in), bias)`` (Hugging Face's ``Conv1D`` stores ``weight.T``)."""
    LINEAR_KINDS[cls] = weights


@dataclass(frozen=True)
class TensorPlan:
    """What to split: ``layers`` maps name patterns to styles; ``divide`` lists
    ``module-pattern.attribute`` paths whose integer value is divided by the tensor size."""

    layers: Mapping[str, str]
    divide: tuple[str, ...] = ()
    #: widths that must divide by the tensor size, with what they are (e.g. {"heads": 4})
    widths: Mapping[str, int] = field(default_factory=dict)

    def style_of(self, name: str) -> str | None:
        """The style of module ``name`` (the first matching pattern), or None."""
        return next((s for p, s in self.layers.items() if name_matches(name, p)), None)


def name_matches(name: str, pattern: str) -> bool:
    """``fnmatch`` per dotted component, as torch's ``parallelize_module``: ``blocks.*.qkv``
    matches ``blocks.3.qkv`` but not ``blocks.3.attn.qkv``."""
    atoms, parts = pattern.split("."), name.split(".")
    return len(atoms) == len(parts) and all(
        fnmatchcase(n, a) for n, a in zip(parts, atoms, strict=True))


def _linear_weights(module: nn.Module) -> Dense | None:
    for cls in type(module).__mro__:
        if cls in LINEAR_KINDS:
            return LINEAR_KINDS[cls](module)
    return None


def _interleaved(src: torch.Tensor, blocks: int, ranks: int) -> torch.Tensor:
    """Lay ``blocks`` equal row blocks out so each rank's chunk holds its part of every block."""
    parts = src.chunk(blocks)
    return torch.cat([torch.cat([b.chunk(ranks)[r] for b in parts]) for r in range(ranks)])


def _copier(src: torch.Tensor) -> Init:
    def init(t: torch.Tensor, gen: torch.Generator | None) -> None:
        with torch.no_grad():
            t.copy_(src)

    return init


def _width_error(name: str, style: str, module: nn.Module, size: int) -> str | None:
    """Why ``module`` cannot take ``style`` over ``size`` ranks (None: it can)."""
    if style == "sequence-norm":
        return None  # any module: its output is gathered
    if style == "embedding":
        if not isinstance(module, nn.Embedding):
            return f"it is a {type(module).__name__}, not an nn.Embedding"
        n = module.num_embeddings
        return None if n % size == 0 else f"its vocabulary of {n} does not split over {size}"
    dense = _linear_weights(module)
    if dense is None:
        known = ", ".join(c.__name__ for c in LINEAR_KINDS)
        return (f"it is a {type(module).__name__}, not a linear layer ({known}; "
                "see register_linear)")
    out_f, in_f = dense[0].shape
    width, k = (in_f, 1) if style == "row" else (out_f, 3 if style == "column-qkv" else 1)
    if width % (k * size):
        what = "input features" if style == "row" else "output features"
        blocks = " in 3 blocks" if k == 3 else ""
        return f"its {width} {what} do not split{blocks} over {size} ranks"
    return None


def from_linear(
    linear: nn.Module, comm: MPI.Intracomm, style: str, *, sequence_parallel: bool = False
) -> ColumnParallelLinear | RowParallelLinear:
    """Return the tensor-parallel layer holding this rank's slice of ``linear``'s weights."""
    dense = _linear_weights(linear)
    if dense is None:
        raise ValueError(f"a {type(linear).__name__} is not a linear layer")
    w, b = dense[0].detach(), dense[1].detach() if dense[1] is not None else None
    out_f, in_f = w.shape
    k = 3 if style == "column-qkv" else 1
    if k > 1:
        if out_f % (k * comm.size):
            raise ValueError(f"fused projection of {out_f} rows does not split "
                             f"into {k} blocks over {comm.size} ranks")
        w = _interleaved(w, k, comm.size)
        b = _interleaved(b, k, comm.size) if b is not None else None
    init, bias_init = _copier(w), (_copier(b) if b is not None else None)
    if style in ("column", "column-qkv", "head"):  # sequence parallel: after a sequence-norm
        return ColumnParallelLinear(in_f, out_f, comm, bias=b is not None, init=init,
                                    bias_init=bias_init, interleave=k,
                                    gathered_input=sequence_parallel)
    if style == "row":
        return RowParallelLinear(in_f, out_f, comm, bias=b is not None,
                                 sequence_parallel=sequence_parallel, init=init,
                                 bias_init=bias_init)
    raise ValueError(f"unknown tensor-parallel style {style!r}; use one of {', '.join(STYLES)}")


def _gather_output(comm: MPI.Intracomm) -> Callable[..., torch.Tensor]:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return gather_sequence(out, comm)

    return hook


def _convert(module: nn.Module, style: str, comm: MPI.Intracomm, sp: bool) -> nn.Module:
    if style == "sequence-norm":  # the module stays (its names too): its output gathered
        if sp and comm.size > 1:
            module.register_forward_hook(_gather_output(comm))
        return module
    if style == "embedding":
        assert isinstance(module, nn.Embedding)
        return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, comm,
                                      sequence_parallel=sp,
                                      init=_copier(module.weight.detach()))
    return from_linear(module, comm, style, sequence_parallel=sp)


def check_plan(module: nn.Module, plan: Mapping[str, str] | TensorPlan, size: int) -> None:
    """Refuse (ValueError naming it) a pattern that matches no module, a matched module that
    cannot take its style, a width or a divided attribute that does not split over ``size``.
    Run it on the dense model (the meta device is fine: only shapes are read)."""
    tp = plan if isinstance(plan, TensorPlan) else TensorPlan(plan)
    names = dict(module.named_modules())
    for what, value in tp.widths.items():
        if value % size:
            raise ValueError(f"the model's {value} {what} do not split over {size} tensor ranks")
    for pattern, style in tp.layers.items():
        if style not in STYLES:
            raise ValueError(f"tensor-parallel plan gives '{pattern}' the unknown style "
                             f"{style!r}; use one of {', '.join(STYLES)}")
        hits = [n for n in names if name_matches(n, pattern)]
        if not hits:
            raise ValueError(f"tensor-parallel plan names '{pattern}', which matches no module; "
                             "use the names of module.named_modules()")
        for n in hits:
            why = _width_error(n, style, names[n], size)
            if why is not None:
                raise ValueError(f"tensor-parallel plan makes '{n}' {style}, but {why}")
    for path in tp.divide:
        pattern, _, attr = path.rpartition(".")
        hits = [n for n in names if name_matches(n, pattern)]
        if not hits:
            raise ValueError(f"tensor-parallel plan divides '{path}', but '{pattern}' matches "
                             "no module")
        for n in hits:
            current = getattr(names[n], attr, None)
            if not isinstance(current, int):
                raise ValueError(f"tensor-parallel plan divides '{n}.{attr}', which is not an "
                                 f"integer attribute of its {type(names[n]).__name__}")
            if current % size:
                raise ValueError(f"tensor-parallel plan divides '{n}.{attr}' = {current}, which "
                                 f"does not split over {size} ranks")


def parallelize_(
    module: nn.Module, plan: Mapping[str, str] | TensorPlan, comm: MPI.Intracomm, *,
    sequence_parallel: bool = False, strict: bool = True, prefix: str = "",
    only: Iterable[str] | None = None,
) -> nn.Module:
    """Replace ``module``'s submodules that ``plan`` names (patterns -> styles) in place.

    Every tensor rank calls it on an identical module (same weights); no communication.
    ``strict`` runs :func:`check_plan` first (ValueError naming what does not fit); a pipeline
    stage, which holds part of the model, checks the dense model instead and passes
    ``strict=False``. ``prefix`` is ``module``'s name in the model the patterns address;
    ``only``: convert just these names (relative to ``module``).
    """
    tp = plan if isinstance(plan, TensorPlan) else TensorPlan(plan)
    if strict:
        check_plan(module, tp, comm.size)
    wanted = set(only) if only is not None else None
    for name, child in list(module.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        style = tp.style_of(full) if name else None
        if style is None or (wanted is not None and name not in wanted):
            continue
        parent_path, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, _convert(child, style, comm, sequence_parallel))
    for path in tp.divide:
        pattern, _, attr = path.rpartition(".")
        for name, child in module.named_modules():
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            if wanted is not None and name not in wanted:
                continue
            if name_matches(full, pattern) and isinstance(getattr(child, attr, None), int):
                setattr(child, attr, getattr(child, attr) // comm.size)
    return module
