"""What every exchange-mode wrapper shares: the protocol defaults and flat views."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpitrain.grad.protocol import ExchangeBase


class ModeWrapper(ExchangeBase):
    """Base of the asynchronous-mode wrappers: ``model.module`` is the wrapped model.

    Implements :class:`~mpitrain.grad.protocol.Exchange` with local defaults; ``params`` are
    the trainable parameters in registration order (the order of the modes' flat buffers).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.params = [p for p in module.parameters() if p.requires_grad]


def flat_grads(params: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the parameters' gradients (zeros where None) into the flat ``out``; return it."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            if p.grad is None:
                out[offset : offset + n].zero_()
            else:
                out[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n
    return out


def set_grads(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Make each parameter's ``.grad`` a copy of its slice of ``flat``."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            src = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = src.clone()
            else:
                p.grad.copy_(src)
            offset += n


def flat_params(params: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the parameters' values into the flat ``out``; return it."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            out[offset : offset + n].copy_(p.reshape(-1))
            offset += n
    return out


def set_params(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Overwrite each parameter with its slice of ``flat``."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def numel(params: Sequence[torch.Tensor]) -> int:
    """Return the total number of elements."""
    return sum(p.numel() for p in params)


def check_one_dtype(params: Sequence[torch.Tensor], mode: str) -> torch.dtype:
    """Return the parameters' common floating dtype or raise ConfigError."""
    from mpitrain.errors import ConfigError, with_hint

    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ConfigError(
            with_hint(
                f"--exchange {mode} needs all trainable parameters in one floating dtype, "
                f"got {sorted(str(d) for d in dtypes)}",
                "cast the model (e.g. model.float()) or use --exchange sync",
            )
        )
    return next(iter(dtypes))
