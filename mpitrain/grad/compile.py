"""``--compile``: ``torch.compile`` that keeps the gradient buckets launching during backward.

One compiled graph for the whole model runs its whole backward as one piece: every
parameter's gradient appears when it ends, so the engine's hooks fire together and no bucket
is in flight while backward computes (the overlap is gone). ``regions`` compiles each child
of the model on its own (torchtitan compiles each transformer block; DDP's optimizer splits
the graph at bucket boundaries for the same reason): a region's backward ends, its gradients
are accumulated, the engine's hooks launch their buckets, and the next region's backward
runs while they move. ``full`` is one graph (for comparison); ``none`` is eager.

Compiling happens in place (``nn.Module.compile``): parameter names and ``state_dict`` keys
stay those of the eager model, so checkpoints move between compiled and eager runs.
"""

from __future__ import annotations

import torch

#: --compile values
MODES = ("none", "regions", "full")


def compile_model(module: torch.nn.Module, mode: str, *, backend: str = "inductor") -> None:
    """Compile ``module`` in place: ``regions`` (each child alone), ``full`` or ``none``.

    ``regions`` on a module without children compiles the module itself (one region).
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return
    children = list(module.children())
    if mode == "full" or not children:
        module.compile(backend=backend)
        return
    for child in children:
        child.compile(backend=backend)
