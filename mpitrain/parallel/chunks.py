"""``StageChunks``: one rank's model chunks (virtual pipeline stages) as one module.

With the interleaved schedule rank ``s`` of ``P`` holds ``v`` chunks; chunk ``c`` is global
stage ``c * P + s`` of ``v * P`` (Megatron-LM's layout: with the built-in GPT,
``GPTStage(config, tp, stage=c * P + s, stages=v * P)``). The container is what the
data-parallel exchange wraps (``DataParallel(chunks, comm=grid.dp_comm)``, or ZeRO's
``ShardedDataParallel``): its parameters are every chunk's, and
``exchange(x, targets, chunk=c)`` runs chunk ``c`` through the exchange's forward.

Names: the container's parameters are ``"{c}.{name in chunk c}"`` (``nn.ModuleList``), and
:meth:`StageChunks.merge_rules` and :meth:`StageChunks.tied_names` use those names, so code
that walks ``named_parameters()`` (the grid's clipping) finds each rule. The built-in GPT
names its blocks by global index, so dropping the ``"{c}."`` prefix gives the dense name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from mpitrain.parallel.spec import Stage


class StageChunks(nn.ModuleList):
    """This rank's chunks in global-stage order; ``forward(x, targets, chunk=c)`` runs chunk
    ``c``. The parameter lists the pipeline engine takes are the chunks' lists joined."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                chunk: int = 0) -> torch.Tensor:  # type: ignore[override]
        """Run chunk ``chunk`` (``stage(x, targets)``, as a one-chunk stage is called)."""
        return self[chunk](x, targets)  # type: ignore[no-any-return]

    def _stages(self) -> list[Stage]:
        return [cast("Stage", m) for m in self]

    def tied_parameters(self) -> list[nn.Parameter]:
        """Every chunk's tied parameters (the first global stage's embedding on rank 0's
        chunk 0, the last's head on the last rank's last chunk): the engine's ``tied=``."""
        return [p for m in self._stages() for p in m.tied_parameters()]

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """Every chunk's replicated, sequence-split parameters (summed over the tensor group)."""
        return [p for m in self._stages() for p in m.sequence_parallel_parameters()]

    def zero3_units(self) -> list[nn.Module]:
        """ZeRO-3's gather units: every chunk's, in chunk order."""
        return [u for m in self._stages() for u in m.zero3_units()]

    def merge_rules(self) -> dict[str, list[Any]]:
        """Every chunk's merge rules (how tensor slices join), under the container's names."""
        return {f"{c}.{k}": v for c, m in enumerate(self._stages())
                for k, v in m.merge_rules().items()}

    def tied_names(self) -> dict[str, str]:
        """Copies of another stage's parameters: the container's name -> the dense name."""
        return {f"{c}.{k}": v for c, m in enumerate(self._stages())
                for k, v in m.tied_names().items()}

    def dense_names(self) -> dict[str, str]:
        """``state_dict`` names -> the dense model's (``"{c}.{name}"`` -> ``name``): the chunks
        hold disjoint parts of one model, so a checkpoint written with chunks resumes on any
        grid and any ``V``. ValueError names a name two chunks share."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for key in self.state_dict(keep_vars=True):
            dense = key.partition(".")[2]
            if dense in seen:
                raise ValueError(f"chunks {seen[dense].partition('.')[0]} and "
                                 f"{key.partition('.')[0]} both hold '{dense}': a model whose "
                                 "stages share a parameter cannot be interleaved")
            seen[dense], out[key] = key, dense
        return out
