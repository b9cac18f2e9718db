"""Model specs: how to build, split and train a user's transformer with no change to its code.

A :class:`ParallelSpec` says how to build the dense model (called on the meta device), its
tensor-parallel plan (:class:`~mpitrain.parallel.convert.TensorPlan`), the repeated blocks a
pipeline splits (and, optionally, the block names where stages begin, as
``torch.distributed.pipelining``'s split points), the modules before and after the blocks,
its tied parameters, its loss and how to initialise a module. :func:`build_stage` turns a spec
into one rank's :class:`SpecStage`: the model is built on the meta device, the modules of other
stages are dropped, and each remaining unit (a block, the embedding, the head, ...) is
materialised, initialised from a generator seeded by its name in the dense model and only then
split over the tensor group, so no rank ever holds more than its part plus one dense unit, and
every split starts equal to the dense model.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from mpitrain.parallel.convert import TensorPlan, check_plan, parallelize_
from mpitrain.parallel.tensor import (
    merge_rules,
    replicated_parameters,
    vocab_parallel_cross_entropy,
)

if TYPE_CHECKING:
    from mpi4py import MPI


class StageForward(Protocol):
    """Run this stage's part of the model: token ids (first stage) or the previous stage's
    activation in; the activation out, or the logits on the last stage."""

    def __call__(self, stage: SpecStage, x: torch.Tensor) -> torch.Tensor: ...


class Loss(Protocol):
    """The last stage's loss from its output and the targets (a scalar)."""

    def __call__(self, stage: SpecStage, out: torch.Tensor, targets: torch.Tensor
                 ) -> torch.Tensor: ...


#: ``init(module, root)``: initialise ``module``'s own tensors (``root``: the dense model)
ModuleInit = Callable[[nn.Module, nn.Module], None]


class Stage(Protocol):
    """What the grid's trainer needs of one rank's part of a model (``SpecStage`` and the
    built-in ``GPTStage``): an ``nn.Module`` called ``stage(x, targets)`` with these."""

    def tied_parameters(self) -> list[nn.Parameter]: ...
    def tied_names(self) -> dict[str, str]: ...
    def zero3_units(self) -> list[nn.Module]: ...
    def sequence_parallel_parameters(self) -> list[nn.Parameter]: ...
    def merge_rules(self) -> dict[str, list[Any]]: ...


class StageBuilder(Protocol):
    """A language model the grid can split (the registry's ``gpt``, ``llama``, ``gpt2`` and
    a user's :class:`ParallelSpec`)."""

    @property
    def name(self) -> str: ...
    @property
    def meta(self) -> Mapping[str, Any]: ...
    def check(self, tensor: int, stages: int) -> None: ...
    def build_stage(self, tp: MPI.Intracomm, stage: int, stages: int,
                    device: torch.device) -> nn.Module: ...
    def describe(self) -> str: ...


def sequential_forward(stage: SpecStage, x: torch.Tensor) -> torch.Tensor:
    """The default: ``pre`` modules in order (first stage), the blocks, ``post`` (last)."""
    h = x.long() if stage.first else x
    names = (*(stage.spec.pre if stage.first else ()), None,
             *(stage.spec.post if stage.last else ()))
    for name in names:
        mods = stage.own_blocks() if name is None else [stage.get_submodule(name)]
        for m in mods:
            out = m(h)
            h = out[0] if isinstance(out, tuple) else out
    return h


def lm_loss(stage: SpecStage, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over logits ``out`` split by vocabulary over the tensor
    group (the ``head`` style; with one tensor rank, plain cross-entropy)."""
    start = stage.tp.rank * out.shape[-1]
    return vocab_parallel_cross_entropy(out.float(), targets.long(), stage.tp, start).mean()


def reset_init(module: nn.Module, root: nn.Module) -> None:
    """The default initialisation: the module's own ``reset_parameters`` (torch's layers)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


@dataclass(frozen=True)
class ParallelSpec:
    """How to build, split and train a model (see the module docstring)."""

    name: str
    build: Callable[[], nn.Module]
    plan: TensorPlan
    blocks: str  # the ModuleList of repeated blocks (dotted name)
    pre: tuple[str, ...] = ()  # modules before the blocks (first stage), in order
    post: tuple[str, ...] = ()  # modules after them (last stage), the last one's output: logits
    split_points: tuple[str, ...] = ()  # block names where stages 2.. begin; () = even split
    forward: StageForward = sequential_forward
    loss: Loss = lm_loss
    tied: Mapping[str, str] = field(default_factory=dict)  # parameter -> the one it copies
    init: ModuleInit = reset_init
    seed: int = 0
    #: the model's shape, saved with its checkpoints and compared on resume
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: split the activations along the sequence too (``--sequence-parallel``): the tensor
    #: layers gather / reduce-scatter the sequence; ``forward`` must take sequence-split
    #: activations (positions of this rank's part: :meth:`SpecStage.positions`)
    sequence_parallel: bool = False

    def check(self, tensor: int, stages: int) -> None:
        """Refuse a plan or split that does not fit (ValueError; see :func:`check_spec`)."""
        check_spec(self, tensor, stages)

    def build_stage(self, tp: MPI.Intracomm, stage: int, stages: int,
                    device: torch.device) -> SpecStage:
        """This rank's stage (see :func:`build_stage`)."""
        return build_stage(self, tp, stage, stages, device)

    def describe(self) -> str:
        """One line: the model and its shape."""
        shape = ", ".join(f"{k} {v}" for k, v in self.meta.items() if k != "model")
        return f"{self.name} ({shape})" if shape else self.name


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, name))
        yield


def stage_blocks(spec: ParallelSpec, count: int, stages: int, stage: int) -> range:
    """The block indices of ``stage``: from the split points, or contiguous and even (the
    first stages take the extras). ValueError names a split point that is not a block."""
    if spec.split_points:
        starts = []
        for point in spec.split_points:
            parent, _, index = point.rpartition(".")
            if parent != spec.blocks or not index.isdigit() or not 0 < int(index) < count:
                raise ValueError(f"pipeline split point '{point}' is not one of the blocks "
                                 f"{spec.blocks}.1 .. {spec.blocks}.{count - 1}")
            starts.append(int(index))
        if starts != sorted(set(starts)) or len(starts) != stages - 1:
            raise ValueError(f"{len(starts)} increasing split points make {len(starts) + 1} "
                             f"stages, not {stages}; give {stages - 1} (or none: an even split)")
        bounds = [0, *starts, count]
        return range(bounds[stage], bounds[stage + 1])
    if count < stages:
        raise ValueError(f"{count} blocks ('{spec.blocks}') do not fill {stages} pipeline stages")
    base, extra = divmod(count, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _inside(name: str, units: Sequence[str]) -> bool:
    return any(name == u or name.startswith(u + ".") for u in units)


def _drop(root: nn.Module, name: str) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, None)


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(recurse=False),
                                    *module.buffers(recurse=False)))


class SpecStage(nn.Module):
    """One rank's (pipeline stage, tensor slice) of a spec's model; parameter names are the
    dense model's (block ``k`` stays ``<blocks>.k`` on any grid). Made by :func:`build_stage`.

    ``forward(x, targets)``: the last stage returns the loss, the others their activation.
    """

    def __init__(self, spec: ParallelSpec, root: nn.Module, tp: MPI.Intracomm, stage: int,
                 stages: int, indices: range) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.first, self.last = stage == 0, stage == stages - 1
        self.indices = indices
        self.stages = stages
        for name, child in root.named_children():
            self.add_module(name, child)
        for name, p in root.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def sequence_split(self) -> bool:
        """Whether activations between the tensor layers are split along the sequence."""
        return self.spec.sequence_parallel and self.tp.size > 1

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Position ids (1, n) of this rank's tokens of a sequence of ``length``: all of
        them, or with sequence parallelism this rank's part."""
        ids = torch.arange(length, device=device)
        return (ids.chunk(self.tp.size)[self.tp.rank] if self.sequence_split()
                else ids).unsqueeze(0)

    def own_blocks(self) -> list[nn.Module]:
        """This stage's blocks, in order."""
        holder = self.get_submodule(self.spec.blocks)
        return [holder.get_submodule(str(i)) for i in self.indices]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = self.spec.forward(self, x)
        if not self.last:
            return out
        if targets is None:
            raise ValueError(f"the last stage of {self.spec.name} needs the targets")
        return self.spec.loss(self, out, targets)

    def _present(self) -> set[str]:
        return {n for n, _ in self.named_parameters(remove_duplicate=False)}

    def tied_parameters(self) -> list[nn.Parameter]:
        """Parameters another stage also holds (summed over the tied group)."""
        if self.stages == 1:
            return []
        have = self._present()
        names = [n for pair in self.spec.tied.items() for n in pair if n in have]
        return [self.get_parameter(n) for n in names]

    def tied_names(self) -> dict[str, str]:
        """Parameters that copy another's: name here -> the dense model's name."""
        have = self._present()
        return {t: s for t, s in self.spec.tied.items() if t in have}

    def zero3_units(self) -> list[nn.Module]:
        """ZeRO-3's gather units: the blocks (the rest stays with the root)."""
        return self.own_blocks()

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters that see only this rank's part of the sequence (norms, row
        biases, position tables): their gradients are summed over the tensor group."""
        if not self.spec.sequence_parallel or self.tp.size == 1:
            return []
        return replicated_parameters(self)

    def merge_rules(self) -> dict[str, list[Any]]:
        """How each parameter's tensor slices join back (tied copies are dropped)."""
        return merge_rules(self, drop=tuple(self.spec.tied))


def _init_unit(spec: ParallelSpec, root: nn.Module, unit: str, device: torch.device,
               copies: Mapping[str, torch.Tensor]) -> None:
    """Materialise ``unit`` (dense) and initialise its modules, children first (HF's order),
    each from a generator seeded by its name; tied copies take their source's values.
    ``unit == ""``: only the modules of the root still on the meta device (what is left)."""
    top = root.get_submodule(unit) if unit else root
    mods = [(f"{unit}.{n}" if unit and n else (unit or n), m) for n, m in top.named_modules()]
    if not unit:
        mods = [(n, m) for n, m in mods if _has_meta(m)]
    for _, m in mods:
        if _has_meta(m):
            m.to_empty(device=device, recurse=False)
    for name, m in reversed(mods):  # pre-order reversed: descendants before ancestors
        with _seeded(spec.seed, name), torch.no_grad():
            spec.init(m, root)
    fresh = {n for n, _ in mods}
    with torch.no_grad():
        for target, value in copies.items():
            if target.rpartition(".")[0] in fresh:
                root.get_parameter(target).copy_(value)


def _source_copies(spec: ParallelSpec, dense: nn.Module, have: set[str], device: torch.device
                   ) -> dict[str, torch.Tensor]:
    """Values of tied sources this stage lacks: their module built alone, seeded as on the
    stage that holds it."""
    out = {}
    for target, source in spec.tied.items():
        if target in have and source not in have:
            mod_name, _, pname = source.rpartition(".")
            mod = dense.get_submodule(mod_name)
            mod.to_empty(device=device, recurse=False)
            with _seeded(spec.seed, mod_name), torch.no_grad():
                spec.init(mod, dense)
            out[target] = getattr(mod, pname).detach().clone()
    return out


def check_spec(spec: ParallelSpec, tensor: int, stages: int) -> None:
    """Refuse (ValueError naming it) a plan or split that does not fit the model, on the
    meta device: the same answer on every rank, before any rank builds its stage."""
    with torch.device("meta"):
        dense = spec.build()
    check_plan(dense, spec.plan, tensor)
    holder = dense.get_submodule(spec.blocks)
    if not isinstance(holder, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"the blocks '{spec.blocks}' are a {type(holder).__name__}, "
                         "not an nn.ModuleList")
    stage_blocks(spec, len(holder), stages, 0)
    names = {n for n, _ in dense.named_parameters(remove_duplicate=False)}
    for name in (*spec.pre, *spec.post):
        try:
            dense.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the spec's stage module '{name}' is not a module of the "
                             "model") from None
    for name in (n for pair in spec.tied.items() for n in pair):
        if name not in names:
            raise ValueError(f"tied parameter '{name}' is not a parameter of the model")


def build_stage(spec: ParallelSpec, tp: MPI.Intracomm, stage: int = 0, stages: int = 1,
                device: torch.device | None = None) -> SpecStage:
    """Build this rank's stage of ``spec`` split over ``tp`` (no communication: every rank of
    ``tp`` builds the same dense units). ValueError names what does not fit the model."""
    dev = device or torch.device("cpu")
    check_spec(spec, tp.size, stages)
    sp = spec.sequence_parallel and tp.size > 1
    with torch.device("meta"):
        dense = spec.build()
    holder = cast("nn.ModuleList", dense.get_submodule(spec.blocks))
    indices = stage_blocks(spec, len(holder), stages, stage)
    kept = nn.ModuleDict({str(i): holder[i] for i in indices})
    first, last = stage == 0, stage == stages - 1
    dropped = [*(spec.pre if not first else ()), *(spec.post if not last else ())]
    with torch.device("meta"):
        source = spec.build()  # tied sources this stage lacks are built from a fresh copy
    _drop(dense, spec.blocks)
    parent, _, attr = spec.blocks.rpartition(".")
    (dense.get_submodule(parent) if parent else dense).add_module(attr, kept)
    for name in dropped:
        _drop(dense, name)
    have = {n for n, _ in dense.named_parameters(remove_duplicate=False)}
    copies = _source_copies(spec, source, have, dev)
    del source
    units = [f"{spec.blocks}.{i}" for i in indices]
    units += [n for n in (*spec.pre, *spec.post) if n not in dropped]
    for unit in units:  # one dense unit at a time, split before the next
        _init_unit(spec, dense, unit, dev, copies)
        parallelize_(dense, spec.plan, tp, strict=False, sequence_parallel=sp,
                     only=[n for n, _ in dense.named_modules() if _inside(n, (unit,))])
    _init_unit(spec, dense, "", dev, copies)  # what is left: rotary buffers, root parameters
    parallelize_(dense, spec.plan, tp, strict=False, sequence_parallel=sp,
                 only=[n for n, _ in dense.named_modules() if n and not _inside(n, units)])
    tie_copies(dense, spec.tied)
    return SpecStage(spec, dense, tp, stage, stages, indices)


def tie_copies(root: nn.Module, tied: Mapping[str, str]) -> None:
    """Where a stage holds both, the copy becomes the source parameter itself."""
    for target, source in tied.items():
        try:
            src = root.get_parameter(source)
            mod_name, _, pname = target.rpartition(".")
            mod = root.get_submodule(mod_name)
            getattr(mod, pname)
        except AttributeError:
            continue
        setattr(mod, pname, src)


def spec_units(stage: SpecStage) -> Sequence[nn.Module]:
    """The units activation checkpointing and ZeRO-3 wrap: the stage's blocks."""
    return stage.own_blocks()
