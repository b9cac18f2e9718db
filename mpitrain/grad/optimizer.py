"""``DistributedOptimizer``: the Horovod-like face of the gradient engine.

It wraps any ``torch.optim.Optimizer`` by composition (no class copied at runtime); it is an
``Optimizer`` instance so LR schedulers accept it, and forwards ``param_groups``, ``state``
and ``defaults`` to the wrapped optimizer on every access (no copies: torch's
``load_state_dict`` replaces those objects, and a kept reference would go stale).
Gradients are exchanged by the same engine as ``DataParallel``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.factory import default_reducer
from mpitrain.comm.reducer import Reducer, default_overlap
from mpitrain.errors import ConfigError, with_hint
from mpitrain.grad.consistency import check_same_layout, layout
from mpitrain.grad.engine import GradEngine
from mpitrain.grad.hooks import Hook, HookState, make_hook

if TYPE_CHECKING:
    from mpi4py import MPI


def _hook_from(compression: Any, hook: Hook | str | None) -> Hook:
    if hook is not None:
        return make_hook(hook) if isinstance(hook, str) else hook
    if compression is None:
        return make_hook("none")
    if isinstance(compression, str):
        return make_hook(compression)
    name = getattr(compression, "name", None)
    if isinstance(name, str):
        return make_hook(name)
    raise ConfigError(
        with_hint(f"unknown compression {compression!r}", "pass 'fp16', 'bf16' or a hook")
    )


class DistributedOptimizer(torch.optim.Optimizer):
    """Average gradients across ``comm`` before each ``step()`` of ``optimizer``.

    Collective (construction checks the parameter layout on all ranks). Like Horovod:
    ``step()`` calls :meth:`synchronize` unless you did; ``with opt.skip_synchronize():``
    after an explicit ``synchronize()`` (e.g. for gradient clipping). With
    ``backward_passes_per_step=k`` gradients of k backward passes are summed locally and
    reduced once (scale each micro-batch loss by 1/k to match one large batch).
    ``zero_grad()`` zeroes the gradient buckets in place (grads are never set to None: they
    alias the buckets). ``op``: "average" (default) or "sum" across ranks.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
        *,
        comm: MPI.Intracomm,
        backward_passes_per_step: int = 1,
        compression: Any = None,
        op: str = "average",
        bucket_mb: float | None = None,
        hook: Hook | str | None = None,
        reducer: Reducer | None = None,
        overlap: bool | None = None,
    ) -> None:
        # no super().__init__(): param_groups/state/defaults are the wrapped optimizer's,
        # forwarded on every access (its load_state_dict replaces those objects)
        self.optimizer = optimizer
        self.comm = comm
        if op not in ("average", "sum"):
            raise ConfigError(with_hint(f"unknown reduction op {op!r}", "use 'average' or 'sum'"))
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if named_parameters is None:
            named = [(f"param.{i}", p) for i, p in enumerate(opt_params)]
        else:
            named = list(named_parameters)
            names = [n for n, _ in named]
            if len(set(names)) != len(names):
                raise ConfigError("named_parameters contains duplicate names")
            known = {id(p) for _, p in named}
            missing = [i for i, p in enumerate(opt_params) if id(p) not in known]
            if missing:
                raise ConfigError(
                    with_hint(
                        f"{len(missing)} optimizer parameters are not in named_parameters",
                        "pass model.named_parameters() of the model the optimizer trains",
                    )
                )
            in_opt = {id(p) for p in opt_params}
            named = [(n, p) for n, p in named if id(p) in in_opt]
        check_same_layout(comm, layout(named), "parameter")
        if overlap is None:
            overlap = getattr(reducer, "overlap", None)
            overlap = default_overlap() if overlap is None else bool(overlap)
        if reducer is None:  # host MPI; staged through host buffers for device parameters
            reducer = default_reducer(comm, [p for _, p in named], overlap=overlap)
        self.reducer = reducer
        self.hook_state = HookState(reducer, average=op == "average")
        self.engine = GradEngine(
            named,
            hook=_hook_from(compression, hook),
            state=self.hook_state,
            bucket_mb=bucket_mb,
            overlap=overlap,
            passes_per_step=backward_passes_per_step,
        )
        self._synchronized = False
        self._skip = False

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (the live list, never a copy)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state (the live mapping)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's default hyperparameters."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"

    def synchronize(self) -> None:
        """Collective: finish the gradient exchange now (step() will not repeat it)."""
        self.engine.synchronize()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Let ``step()`` inside skip its synchronize (call :meth:`synchronize` yourself)."""
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Collective unless synchronized: average gradients, then step the wrapped optimizer."""
        if not self._synchronized and not self._skip:
            self.engine.synchronize()
        self._synchronized = False
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buckets in place (``set_to_none`` is ignored: grads alias buckets)."""
        self.engine.zero_grads()

    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported after wrapping (the buckets are laid out once)."""
        raise NotImplementedError(
            "DistributedOptimizer.add_param_group: add groups before wrapping the optimizer"
        )
