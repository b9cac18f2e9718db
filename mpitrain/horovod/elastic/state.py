"""``hvd.elastic.TorchState``: models, optimizers, samplers and plain values as one state.

Each model, optimizer and :class:`ElasticSampler` given to :class:`TorchState` gets a handler
that saves a deep copy of its ``state_dict()`` on ``commit()``, loads it back on
``restore()`` and broadcasts rank 0's on ``sync()`` (``broadcast_parameters``,
``broadcast_optimizer_state``, ``broadcast_object``); other keyword arguments are plain
values (:class:`~mpitrain.horovod.elastic.common.ObjectState`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mpitrain.horovod.api import broadcast_object
from mpitrain.horovod.basics import rank
from mpitrain.horovod.elastic.common import ObjectState
from mpitrain.horovod.elastic.sampler import ElasticSampler
from mpitrain.horovod.optimizer import broadcast_optimizer_state, broadcast_parameters


class StateHandler:
    """Save, restore and sync one object that has ``state_dict``/``load_state_dict``."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._saved: Any = None
        self.save()

    def save(self) -> None:
        """Keep a deep copy of the object's state."""
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        """Load the kept copy back."""
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        """Collective: take rank 0's state."""
        raise NotImplementedError

    def set_value(self, value: Any) -> None:
        """Track a new object (``state.model = other``) and save it."""
        self.value = value
        self.save()


class ModelStateHandler(StateHandler):
    """A ``torch.nn.Module``: parameters and buffers broadcast from rank 0."""

    def sync(self) -> None:
        """Collective: broadcast rank 0's ``state_dict()`` in place."""
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class OptimizerStateHandler(StateHandler):
    """A ``torch.optim.Optimizer`` (also ``hvd.DistributedOptimizer``)."""

    def sync(self) -> None:
        """Collective: ``broadcast_optimizer_state`` from rank 0."""
        broadcast_optimizer_state(self.value, root_rank=0)


class SamplerStateHandler(StateHandler):
    """An :class:`ElasticSampler`: its position (epoch, processed samples)."""

    def sync(self) -> None:
        """Collective: load rank 0's position."""
        self.value.load_state_dict(broadcast_object(self.value.state_dict()))


_handler_registry: list[tuple[type, type[StateHandler]]] = [
    (torch.nn.Module, ModelStateHandler),
    (torch.optim.Optimizer, OptimizerStateHandler),
    (ElasticSampler, SamplerStateHandler),
]


def get_handler_registry() -> list[tuple[type, type[StateHandler]]]:
    """Return the (type, handler class) pairs :class:`TorchState` consults, first match wins."""
    return _handler_registry


def set_handler_registry(registry: list[tuple[type, type[StateHandler]]]) -> None:
    """Replace the (type, handler class) pairs (Horovod's extension point)."""
    _handler_registry[:] = registry


def _handler(value: Any) -> StateHandler | None:
    for kind, handler in _handler_registry:
        if isinstance(value, kind):
            return handler(value)
    return None


class TorchState(ObjectState):
    """The state of a PyTorch training run for ``hvd.elastic.run``.

    Args:
        model: a module (optional).
        optimizer: an optimizer (optional).
        kwargs: more modules, optimizers, samplers or plain picklable values, kept as
            attributes (``state.epoch``).
    """

    def __init__(self, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        kwargs.update(model=model, optimizer=optimizer)
        handlers: dict[str, StateHandler] = {}
        plain: dict[str, Any] = {}
        for name, value in kwargs.items():
            handler = _handler(value)
            if handler is None:
                plain[name] = value
            else:
                handlers[name] = handler
        self._handlers = handlers
        for name, handler in handlers.items():
            setattr(self, name, handler.value)
        super().__init__(bcast_object=broadcast_object, get_rank=rank, **plain)

    def save(self) -> None:
        """Save every handled object and plain value."""
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        """Put back every handled object and plain value."""
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self) -> None:
        """Collective: rank 0's objects and values on every rank."""
        for handler in self._handlers.values():
            handler.sync()
        super().sync()

    def __setattr__(self, name: str, value: Any) -> None:
        handlers = self.__dict__.get("_handlers")
        if handlers is not None and name in handlers and name in self.__dict__:
            handlers[name].set_value(value)
        super().__setattr__(name, value)
