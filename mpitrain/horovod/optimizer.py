"""``hvd.DistributedOptimizer`` and the broadcasts that make every rank start the same.

The optimizer is mpitrain's gradient engine (``mpitrain.grad.optimizer``) over a
:class:`HorovodReducer`: each gradient bucket is reduced through the Horovod collectives, so
buckets are agreed like any ``hvd.allreduce`` (errors instead of hangs), honour
``process_set`` and ``gradient_predivide_factor``, and ranks that have called ``hvd.join()``
contribute zeros. The parameters of a ``SparseAdam`` keep sparse gradients, exchanged as
Horovod does (``mpitrain.horovod.sparse_grads``); on a rank outside ``process_set`` the
optimizer steps on its local gradients, as Horovod's does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from mpitrain.comm.handle import DONE, Handle
from mpitrain.comm.reducer import Reducer
from mpitrain.grad.broadcast import initialize_optimizer_state
from mpitrain.grad.compression import Compression
from mpitrain.grad.engine import GradEngine
from mpitrain.grad.optimizer import DistributedOptimizer as _EngineOptimizer
from mpitrain.horovod import context as _c
from mpitrain.horovod import ops as _o
from mpitrain.horovod.handles import synchronize
from mpitrain.horovod.sparse_grads import SparseGrads, needs_sparse

_G = _c.global_process_set


class HorovodReducer:
    """A :class:`~mpitrain.comm.reducer.Reducer` that reduces through ``hvd`` all-reduces."""

    def __init__(self, process_set: _c.ProcessSet, prescale: float = 1.0,
                 postscale: float = 1.0) -> None:
        self.process_set = process_set
        self.prescale = prescale
        self.postscale = postscale
        self.overlap = True
        self._size = process_set.size() or 1

    @property
    def size(self) -> int:
        """Number of ranks in the process set."""
        return self._size

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Collective: start an agreed in-place Average (or Sum) of ``t``."""
        op = _o.Average if average else _o.Sum
        return _o.allreduce_op([t], [t], None, op, self.prescale, self.postscale,
                               self.process_set, False, call=_o.STEP)

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Collective: blocking form of :meth:`iallreduce_`."""
        self.iallreduce_(t, average=average).wait()


class LocalReducer:
    """The reducer of a rank outside the optimizer's process set: nothing is exchanged."""

    size = 1
    overlap = True

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        """Leave ``t`` as it is (a set of one)."""
        return DONE

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Leave ``t`` as it is (a set of one)."""


STEP_AFTER_SYNCHRONIZE = (
    "optimizer.step() called without optimizer.skip_synchronize() context after "
    "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
    "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your "
    "code."
)


class HorovodOptimizer(_EngineOptimizer):
    """The engine's optimizer, sparse gradients beside it, and Horovod's warning for
    ``step()`` after ``synchronize()``.

    Horovod then exchanges the gradients a second time; here the step uses the gradients
    already exchanged (the same values for Average, and no second sum for Sum).
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named: list[tuple[str, torch.nn.Parameter]], *, sparse: SparseGrads | None,
                 **engine_options: Any) -> None:
        super().__init__(optimizer, named, **engine_options)  # checks the whole layout
        self.sparse = sparse
        if sparse is not None:  # its parameters leave the engine (their grads stay sparse)
            old = self.engine
            old.remove_hooks()
            outside = {id(p) for _, p in sparse.named}
            dense = [(n, p) for n, p in zip(old.names, old.params, strict=True)
                     if id(p) not in outside]
            self.engine = GradEngine(dense, hook=old.hook, state=self.hook_state,
                                     overlap=old.overlap, passes_per_step=old.passes_per_step)
            sparse.zero_grad()

    def synchronize(self) -> None:
        """Collective: finish the gradient exchange now (step() will not repeat it)."""
        super().synchronize()
        if self.sparse is not None:
            self.sparse.exchange()

    def step(self, closure: Any = None) -> Any:
        """Collective unless synchronized: warn as Horovod after an explicit synchronize()."""
        if self._synchronized and not self._skip:
            warnings.warn(STEP_AFTER_SYNCHRONIZE, stacklevel=2)
        if not self._synchronized and not self._skip:
            self.synchronize()
        self._synchronized = False
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the engine's gradients in place; drop the sparse ones."""
        super().zero_grad(set_to_none)
        if self.sparse is not None:
            self.sparse.zero_grad()


def _check_named(optimizer: torch.optim.Optimizer, named_parameters: Any
                 ) -> list[tuple[str, torch.nn.Parameter]]:
    if named_parameters is None:  # Horovod's own names: group i, parameter j
        return [(f"allreduce.noname.{i}.{j}", p)
                for i, g in enumerate(optimizer.param_groups)
                for j, p in enumerate(g["params"])]
    named = list(named_parameters)
    if any(not isinstance(p, tuple) or len(p) != 2 for p in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    names = [n for n, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. "
                         f"Found duplicates: {', '.join(dups)}")
    all_ids = {id(v) for g in optimizer.param_groups for v in g["params"]}
    unnamed = all_ids - {id(v) for _, v in named}
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters "
                         f"were not named. Python object ids: {', '.join(map(str, unnamed))}")
    return named


def _check_groups(num_groups: int, groups: Any) -> None:
    if groups is None:
        groups = num_groups
    if isinstance(groups, int):
        if groups < 0:
            raise ValueError("groups should be a non-negative integer or a list of list of "
                             "torch.Tensor.")
        return
    if not isinstance(groups, list) or any(
        not isinstance(g, list | tuple) or any(not isinstance(p, torch.Tensor) for p in g)
        for g in groups
    ):
        raise ValueError("groups should be a non-negative integer or a list of list of "
                         "torch.Tensor.")
    seen: set[int] = set()
    for g in groups:
        for p in g:
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one of groups")
            seen.add(id(p))


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: int = _o.Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: _c.ProcessSet = _G,
) -> HorovodOptimizer:
    """Collective: wrap ``optimizer`` so gradients are averaged (or summed) across the set.

    ``groups``/``num_groups`` are validated as Horovod does; fusion uses the engine's fixed
    buckets instead (the reduced values are the same). On a rank outside ``process_set``
    nothing is exchanged (as in Horovod) and nothing collective happens.
    """
    ctx = _c.context()
    sid = process_set.process_set_id
    local = sid is not None and ctx.sets.get(sid) is process_set and not process_set.included()
    if not local:
        comm = ctx.comm_of(process_set, "hvd.DistributedOptimizer")
        ctx.agree("hvd.DistributedOptimizer", process_set)  # before the engine's layout check
    if op == _o.Adasum:
        raise NotImplementedError(
            "DistributedOptimizer(op=hvd.Adasum): Adasum is not provided by mpitrain.horovod; "
            "use hvd.Average (default) or hvd.Sum"
        )
    if op not in (_o.Average, _o.Sum):
        raise ValueError(f"DistributedOptimizer supports op=hvd.Average or hvd.Sum, got {op!r}")
    if gradient_predivide_factor != 1.0 and op != _o.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    named = _check_named(optimizer, named_parameters)
    _check_groups(num_groups, groups)
    f = float(gradient_predivide_factor)
    sparse = (SparseGrads(named, process_set, op, sparse_as_dense, 1.0 / f, f)
              if needs_sparse(optimizer) else None)
    if local:
        from mpi4py import MPI

        comm, compression = MPI.COMM_SELF, Compression.none
        reducer: Reducer = LocalReducer()
    else:
        reducer = HorovodReducer(process_set, 1.0 / f, f)
    opt = HorovodOptimizer(
        optimizer,
        named,
        sparse=sparse,
        comm=comm,
        backward_passes_per_step=backward_passes_per_step,
        compression=getattr(compression, "name", compression),
        op="average" if op == _o.Average else "sum",
        reducer=reducer,
        overlap=True,
    )
    if local:
        return opt
    opt.engine.timeline = ctx.timeline  # hvd.start_timeline records its buckets
    ctx.engines.add(opt.engine)
    return opt


def broadcast_parameters(params: Any, root_rank: int, process_set: _c.ProcessSet = _G) -> None:
    """Collective: overwrite parameters/buffers in place with global rank ``root_rank``'s.

    Takes a ``state_dict()`` (sorted by name, like Horovod), ``named_parameters()`` or a list
    of tensors; a layout that differs between ranks raises HorovodInternalError everywhere.
    """
    if isinstance(params, dict):
        pairs = sorted(params.items())
    else:
        pairs = [p if isinstance(p, tuple) else (None, p) for p in params]
    handles = [_o.broadcast_op(p, root_rank, name, process_set, True) for name, p in pairs]
    for h in handles:
        synchronize(h)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: torch.nn.Module | None = None, *,
                              process_set: _c.ProcessSet = _G) -> None:
    """Collective: give every rank ``root_rank``'s optimizer state and hyperparameters.

    As Horovod: a fresh optimizer (no state yet) first takes one step on zero gradients on
    every rank, so its state exists (weight decay applies, momentum buffers appear, Adam's
    step becomes 1); ``model`` names sparse embeddings. LBFGS (which Horovod refuses) is
    broadcast without that step. Then the root's
    ``state_dict()`` is broadcast and loaded.
    """
    if isinstance(model, _c.ProcessSet):  # Horovod < 0.28 callers: positional process set
        model, process_set = None, model
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"broadcast_optimizer_state: model must be a torch.nn.Module, "
                         f"got {type(model).__name__}")
    inner = getattr(optimizer, "optimizer", optimizer)  # a DistributedOptimizer wraps one
    ctx = _c.context()
    ctx.comm_of(process_set, "broadcast_optimizer_state")  # a non-member raises before a step
    initialize_optimizer_state(inner, model)
    is_root = ctx.world.rank == root_rank
    state = _o.object_op("broadcast", inner.state_dict() if is_root else None, root_rank,
                         "broadcast_optimizer_state", process_set)
    if not is_root:
        inner.load_state_dict(state)
