"""Local SGD: H purely local steps, then one all-reduce averages the models (post-local SGD).

Each rank steps its own optimizer on its own gradients; every ``local_steps`` optimizer
steps the parameters (floating buffers, and optionally the optimizer's floating state such
as momentum) are averaged with ONE all-reduce of a flat buffer. The first ``warmup_steps``
steps are ordinary synchronous steps (gradients averaged before the update): post-local SGD
(Lin et al., "Don't use large mini-batches, use local SGD", ICLR 2020).

With ``local_steps=1`` and optimizer-state averaging this is synchronous SGD up to float
rounding: for SGD with momentum both the update and the momentum buffer are linear in the
gradient, so averaging them after the step equals stepping with the averaged gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpitrain.comm.factory import close_reducer
from mpitrain.grad.broadcast import broadcast_parameters
from mpitrain.grad.hooks import allreduce_hook
from mpitrain.grad.modes.base import (
    ModeWrapper,
    check_one_dtype,
    flat_grads,
    flat_params,
    numel,
    set_grads,
    set_params,
)
from mpitrain.grad.modes.transport import FlatTransport, transport_for
from mpitrain.grad.protocol import BuildContext, ModeSpec
from mpitrain.grad.recorded import recorded
from mpitrain.timeline.recorder import NULL, Timeline

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpitrain.config import TrainConfig


class LocalSGD(ModeWrapper):
    """Wrap ``module`` for local SGD over ``comm`` (collective: broadcasts from rank 0).

    Args:
        module: the model.
        comm: the communicator to average over.
        local_steps: H, optimizer steps between model averages (>= 1).
        warmup_steps: synchronous (gradient-averaging) steps before local SGD starts.
        average_optimizer_state: also average floating optimizer state (momentum, Adam
            moments) at each model average.
        transport: the all-reduce path (reducer + compression hook); default: blocking host
            MPI on ``comm`` (staged for device parameters). With compression the parameters
            travel as their change since the last average (small numbers, small rounding).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        comm: MPI.Intracomm,
        *,
        local_steps: int,
        warmup_steps: int = 0,
        average_optimizer_state: bool = False,
        transport: FlatTransport | None = None,
    ) -> None:
        super().__init__(module)
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        self.comm = comm
        if transport is None:
            from mpitrain.comm.factory import default_reducer

            transport = FlatTransport(default_reducer(comm, self.params, overlap=False))
        self.transport = transport
        self.local_steps = local_steps
        self.warmup_steps = warmup_steps
        self.average_optimizer_state = average_optimizer_state
        dtype = check_one_dtype(self.params, "local-sgd")
        broadcast_parameters(module, comm, root=0)
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._grad_buf = torch.zeros(numel(self.params), dtype=dtype, device=dev)
        # the last average (identical everywhere): compressed averages send w - anchor
        self._anchor: torch.Tensor | None = None
        if transport.hook is not allreduce_hook:
            self._anchor = flat_params(self.params, torch.empty_like(self._grad_buf))
        self.steps = 0  # optimizer steps taken
        self.averages = 0  # model averages done
        self._since_average = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: torch.Tensor | None = None
        self.timeline: Timeline = NULL

    def set_timeline(self, recorder: Timeline) -> None:
        """Record the warm-up gradient all-reduces and the model averages into ``recorder``."""
        self.timeline = recorder

    def _allreduce(self, flat: torch.Tensor, key: int, name: str) -> None:
        """Collective: average ``flat`` in place (recorded as ``name``)."""
        recorded(self.timeline, name, flat.numel() * flat.element_size(), "allreduce",
                 lambda: self.transport.iallreduce_(flat, key)).wait()

    def synchronize(self) -> None:
        """Collective: all-reduce gradients during warm-up; local (no traffic) afterwards."""
        if self.steps < self.warmup_steps and self.comm.size > 1:
            self._allreduce(flat_grads(self.params, self._grad_buf), 0, "allreduce gradients")
            set_grads(self.params, self._grad_buf)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Take a local optimizer step, no communication (remembers the optimizer for averaging)."""
        self._optimizer = opt
        if self._pending is not None:  # resumed: this rank's own optimizer state
            rest = self._pending[numel(self.params) :]
            if rest.numel():
                set_params(self._opt_tensors(), rest)
            self._pending = None
        opt.step()

    def after_step(self) -> None:
        """Collective: every ``local_steps`` steps after warm-up, average the models."""
        self.steps += 1
        if self.steps <= self.warmup_steps:
            return
        self._since_average += 1
        if self._since_average >= self.local_steps:
            self.average()

    def _state_tensors(self) -> list[torch.Tensor]:
        out = [b for b in self.module.buffers() if b.is_floating_point()]
        if self.average_optimizer_state:
            out += self._opt_tensors()
        return out

    def average(self) -> None:
        """Collective: average parameters (+ float buffers, optimizer state) in one all-reduce."""
        self._since_average = 0
        self.averages += 1
        if self.comm.size == 1:
            return
        extra = self._state_tensors()
        n_params = numel(self.params)
        flat = torch.empty(
            n_params + numel(extra), dtype=self._grad_buf.dtype, device=self._grad_buf.device
        )
        flat_params(self.params, flat[:n_params])
        if extra:
            flat_params(extra, flat[n_params:])
        if self._anchor is not None:
            flat[:n_params].sub_(self._anchor)
        self._allreduce(flat, 1, "allreduce model average")
        if self._anchor is not None:
            flat[:n_params].add_(self._anchor)
            self._anchor.copy_(flat[:n_params])
        set_params(self.params, flat[:n_params])
        if extra:
            set_params(extra, flat[n_params:])

    def close(self) -> None:
        """Collective: finish traffic; stop the transport's communication thread."""
        self.drain()
        close_reducer(self.transport.reducer)

    def metrics(self) -> dict[str, float]:
        """Steps since the last model average (the models' divergence horizon)."""
        return {"local_steps_since_average": float(self._since_average)}

    def replicas_identical(self) -> bool:
        """Only right after a model average: between averages each rank has its own model."""
        return self._since_average == 0

    def _opt_tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        if self._optimizer is not None:
            for p in self.params:
                st = self._optimizer.state.get(p, {})
                for key in sorted(st):
                    v = st[key]
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                        out.append(v)
        return out

    def exchange_state_dict(self) -> dict[str, Any] | None:
        """Collective: gather every rank's model and optimizer state (they differ between
        averages) to rank 0; rank 0 returns them with the counters, other ranks None."""
        own = torch.cat([t.detach().reshape(-1) for t in [*self.params, *self._opt_tensors()]])
        gathered = self.comm.gather(own, root=0)
        if self.comm.rank != 0:
            return None
        return {
            "mode": "local-sgd",
            "steps": self.steps,
            "averages": self.averages,
            "since_average": self._since_average,
            "ranks": gathered,
            "anchor": None if self._anchor is None else self._anchor.clone(),
        }

    def load_exchange_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and, when the rank count is unchanged, this rank's own model and
        optimizer state (otherwise every rank continues from rank 0's, right after an average).
        """
        self.steps = int(state["steps"])
        self.averages = int(state["averages"])
        ranks = state["ranks"]
        if len(ranks) == self.comm.size:
            self._since_average = int(state["since_average"])
            self._pending = ranks[self.comm.rank]
            set_params(self.params, self._pending[: numel(self.params)])
        else:
            self._since_average = 0
        if self._anchor is not None:  # the last average, identical on every rank
            saved = state.get("anchor")
            if saved is not None and saved.numel() == self._anchor.numel():
                self._anchor.copy_(saved)
            else:
                flat_params(self.params, self._anchor)


@dataclass(frozen=True)
class LocalSGDOptions:
    """``--exchange local-sgd``'s options (TrainConfig fields of the same names)."""

    local_steps: int = 4
    sync_warmup_steps: int | None = None  #: None: the lr warm-up's steps
    local_sgd_average_optimizer: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LocalSGDOptions:
        """Take the options from ``cfg`` (validated there)."""
        return cls(cfg.local_steps, cfg.sync_warmup_steps, cfg.local_sgd_average_optimizer)


def _build(ctx: BuildContext, opts: LocalSGDOptions) -> LocalSGD:
    warmup = opts.sync_warmup_steps
    if warmup is None:
        warmup = int(ctx.cfg.warmup_epochs * ctx.steps_per_epoch)
    params = [p for p in ctx.module.parameters() if p.requires_grad]
    return LocalSGD(
        ctx.module,
        ctx.world.comm,
        local_steps=opts.local_steps,
        warmup_steps=warmup,
        average_optimizer_state=opts.local_sgd_average_optimizer,
        transport=transport_for(ctx, params, overlap=False),
    )


SPEC = ModeSpec(
    name="local-sgd",
    options=LocalSGDOptions.from_config,
    build=_build,
    lag=lambda opts: opts.local_steps - 1,
    fields=("local_steps", "sync_warmup_steps", "local_sgd_average_optimizer"),
)
