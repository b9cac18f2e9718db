"""Activation checkpointing of a model's units (its blocks), in place, with torch's own tools.

``full``: a unit keeps only its inputs; backward recomputes its whole forward
(``torch.utils.checkpoint.checkpoint``, non-reentrant, RNG state preserved). ``selective``
(torchtitan's op-level selective checkpointing): the outputs of the compute-heavy ops are kept
(attention, and every other matrix product: torchtitan's policy, which recomputes the rest
of them) and the cheap ones (norms, activations, adds, views) recomputed
(``torch.utils.checkpoint.create_selective_checkpoint_contexts`` with a policy).

In place: the unit's ``forward`` is wrapped on the instance, so module names, ``state_dict``
keys, tensor-parallel plans and hooks stay as they were (``checkpoint_wrapper`` would add a
``_checkpoint_wrapped_module.`` level to every name). The recomputation calls the unit's own
``forward``, not the module, so **the unit's hooks run once**, around the checkpointed call:
ZeRO-3's gather hooks on a unit that is also its gather unit see one forward, and the
recomputation runs inside the unit's backward, after ZeRO-3's pre-backward hook has gathered
its parameters. A ZeRO-3 unit *inside* a checkpointed one would see its hooks run again by the
recomputation, which frees its parameters before their backward: refused
(:func:`check_zero3_units`).

Collectives inside a unit (tensor-parallel layers, sequence-parallel gathers) run again in the
recomputation: every rank of a tensor group builds the same graph and runs its backward in the
same order, so the recomputed collectives pair up as the forward's did.

Counting (``PipelineEngine(measure_memory=True)``, ``parallel.pipeline._SavedBytes``): torch's
checkpoint saves a unit's inputs through the saved-tensor hooks active outside it, so
an outer count sees them; what the recomputation saves is dropped as soon as it is used. The
outputs ``selective`` keeps live in torch's cache, unseen by outer hooks: each unit's output
passes one identity node that saves them for the hooks to see (released when that node's
backward runs, just before the unit's own: nothing lives longer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mpitrain.errors import ConfigError, with_hint

#: ``--activation-checkpointing`` choices
MODES = ("none", "full", "selective")


def _ops(*names: str) -> frozenset[Any]:
    aten = torch.ops.aten
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


#: ops whose outputs ``selective`` keeps (torchtitan's list: matrix products, attention) ...
SAVED_OPS = _ops("mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
                 "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")
#: ... except every second one of these (torchtitan's policy: in a transformer block the
#: attention's and the MLP's output projections are recomputed, their inputs' are kept)
ALTERNATE_OPS = _ops("mm", "addmm")


@runtime_checkable
class DeclaresUnits(Protocol):
    """A data-parallel model that says which of its modules to checkpoint."""

    def activation_checkpoint_units(self) -> Sequence[nn.Module]:
        """Its repeated blocks, each called once per forward."""
        ...


class _Hold(torch.autograd.Function):
    """Identity on ``out`` that saves ``held`` for backward (seen by saved-tensor hooks)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *held: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*held)
        ctx.count = len(held)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, *([None] * ctx.count))


def _hold(out: Any, held: Sequence[torch.Tensor]) -> Any:
    """``out`` (a tensor, or a tuple/list holding one that needs a gradient) with its first
    such tensor passed through :class:`_Hold`."""
    hold: Any = _Hold
    items = [out] if isinstance(out, torch.Tensor) else \
        list(out) if isinstance(out, (tuple, list)) else []
    for i, t in enumerate(items):
        if held and isinstance(t, torch.Tensor) and t.requires_grad:
            items[i] = hold.apply(t, *held)
            if isinstance(out, torch.Tensor):
                return items[0]
            return type(out)(items) if type(out) in (tuple, list) else type(out)(*items)
    return out


def _selective_contexts(kept: list[torch.Tensor]) -> Any:
    """torch's selective-checkpoint contexts whose policy keeps :data:`SAVED_OPS`' outputs
    but every second :data:`ALTERNATE_OPS` one's (recorded into ``kept`` in the forward, for
    the count)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    count = {False: 0, True: 0}  # matrix products seen: forward, recomputation

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op not in SAVED_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if op in ALTERNATE_OPS:
            count[ctx.is_recompute] += 1
            if count[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        out = getattr(ctx, "op_output", None)  # torch versions that pass the output
        if not ctx.is_recompute and out is not None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            kept.extend(t for t in outs if isinstance(t, torch.Tensor))
        return CheckpointPolicy.MUST_SAVE

    make: Any = create_selective_checkpoint_contexts  # (untyped in torch)
    return make(policy)


class _Checkpointed:
    """A unit's ``forward`` run under activation checkpointing (set on the instance)."""

    def __init__(self, inner: Callable[..., Any], mode: str) -> None:
        self.inner, self.mode = inner, mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
            return self.inner(*args, **kwargs)
        if self.mode == "full":
            return checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True,
                              **kwargs)
        kept: list[torch.Tensor] = []
        out = checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True,
                         context_fn=partial(_selective_contexts, kept), **kwargs)
        held, kept[:] = tuple(kept), []
        return _hold(out, held)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: use one of "
                         f"{', '.join(MODES)}")
    if mode == "selective":
        try:
            from torch.utils.checkpoint import create_selective_checkpoint_contexts  # noqa: F401
        except ImportError:
            raise ValueError(f"selective activation checkpointing needs torch >= 2.4 "
                             f"(this is {torch.__version__}); use 'full'") from None


def apply_activation_checkpointing(units: Sequence[nn.Module], mode: str) -> None:
    """Checkpoint each of ``units`` in place: ``none`` (nothing), ``full`` or ``selective``.

    Pass a model's repeated blocks, each called once per forward (a model spec's
    ``spec_units(stage)``, the GPT's blocks); with ZeRO-3 make them its gather units too.

    Raises:
        ValueError: an unknown mode, or a unit that is checkpointed already.
    """
    _check_mode(mode)
    if mode == "none":
        return
    again = [type(m).__name__ for m in units if checkpointing_mode(m) != "none"]
    if again:
        raise ValueError(f"{len(again)} unit(s) ({again[0]}, ...) are checkpointed already")
    for m in units:
        m.forward = _Checkpointed(m.forward, mode)  # type: ignore[method-assign]


def remove_activation_checkpointing(units: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_activation_checkpointing` on ``units`` (others are left as they are)."""
    for m in units:
        if checkpointing_mode(m) != "none":
            del m.forward


def checkpointing_mode(module: nn.Module) -> str:
    """``module``'s own activation checkpointing: ``none``, ``full`` or ``selective``."""
    wrapped = module.__dict__.get("forward")
    return wrapped.mode if isinstance(wrapped, _Checkpointed) else "none"


def check_zero3_units(root: nn.Module, units: Sequence[nn.Module]) -> None:
    """Refuse ZeRO-3 gather units that lie strictly inside a checkpointed module of ``root``
    (its recomputation would run their gather hooks again and free their parameters before
    their backward); a unit that is checkpointed itself, or holds checkpointed modules, is fine.
    """
    names = {id(m): n for n, m in root.named_modules()}
    for outer_name, outer in root.named_modules():
        if checkpointing_mode(outer) == "none":
            continue
        inside = {id(m) for m in outer.modules() if m is not outer}
        for u in units:
            if id(u) in inside:
                raise ConfigError(with_hint(
                    f"ZeRO-3 unit '{names.get(id(u), type(u).__name__)}' lies inside the "
                    f"activation-checkpointed '{outer_name or type(outer).__name__}': its "
                    "recomputation would gather and free the unit's parameters again before "
                    "their backward",
                    "make the checkpointed modules ZeRO-3's units (units=...), or checkpoint "
                    "the units themselves"))


def zero3_units_around(module: nn.Module, checkpointed: Sequence[nn.Module]) -> list[nn.Module]:
    """ZeRO-3's default units of ``module``, where one lies inside a ``checkpointed`` module
    that module instead (in the default units' order): every other part keeps its own."""
    from mpitrain.grad.zero.wrapper import default_units

    out: list[nn.Module] = []
    for u in default_units(module):
        pick = next((c for c in checkpointed if any(m is u for m in c.modules())), u)
        if all(pick is not o for o in out):
            out.append(pick)
    return out


def declared_units(module: nn.Module, model: str, mode: str) -> list[nn.Module]:
    """Checkpoint the units ``module`` declares (``activation_checkpoint_units()``) and return
    them ([] for ``none``); a data-parallel model that declares none is refused.

    Raises:
        ConfigError: naming the model, with a hint (the same on every rank).
    """
    if mode == "none":
        return []
    units = list(module.activation_checkpoint_units()) if isinstance(module, DeclaresUnits) \
        else []
    if not units:
        raise ConfigError(with_hint(
            f"--activation-checkpointing {mode}: --model {model} made a {type(module).__name__}, "
            "which declares no units to checkpoint",
            "give it a method activation_checkpoint_units(self) returning its repeated blocks "
            "(each called once per forward), or drop --activation-checkpointing"))
    try:
        apply_activation_checkpointing(units, mode)
    except ValueError as exc:
        raise ConfigError(with_hint(f"--model {model}: {exc}",
                                    "return each block once from activation_checkpoint_units()"
                                    )) from None
    return units
