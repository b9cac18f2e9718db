"""``bench parallel``'s torch stack for a model spec (``--model llama``, ``gpt2``).

The stage is the one mpitrain's methods train (``spec.build_stage`` with a tensor group of
one: the dense stage, the same seeded weights). The spec's own tensor plan is translated to
torch's DTensor ``parallelize_module``, as torchtitan writes it for Llama by hand:

- the plan's layers (mpitrain's one-rank tensor layers, holding ``nn.Linear``-layout weights:
  GPT-2's ``Conv1D`` too) become ``nn.Linear`` / ``nn.Embedding`` with the same weights,
  since DTensor's styles know only those two;
- ``column`` -> ``ColwiseParallel``, ``row`` -> ``RowwiseParallel``, ``column-qkv`` ->
  ``ColwiseParallel`` over rows reordered so that its even split gives each rank whole heads
  of q, k and v (GPT-2's fused ``c_attn``), ``embedding`` -> ``RowwiseParallel`` (vocabulary
  rows, output replicated), ``head`` -> ``ColwiseParallel`` whose logits stay split for
  ``loss_parallel`` (no gather, like mpitrain's vocabulary-parallel cross-entropy);
- the plan's ``divide`` attributes (GPT-2's ``split_size`` and ``num_heads``) are divided by
  ``T``; Llama's attention reshapes to ``(-1, head_dim)`` and needs nothing;
- a tied head on the embedding's stage is the embedding's DTensor again once both are split.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mpitrain.parallel.spec import tie_copies

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh


#: the plan's styles that split weights (``sequence-norm`` is sequence parallelism's, not run)
SPLIT = ("column", "column-qkv", "row", "embedding", "head")


def _planned(stage: Any) -> list[tuple[str, str]]:
    """(module name, style) of every module of ``stage`` its spec's plan splits."""
    plan = stage.spec.plan
    return [(n, s) for n, _ in stage.named_modules() if n and (s := plan.style_of(n)) in SPLIT]


def torch_layers(stage: Any, tensor: int) -> None:
    """Swap the planned layers of the dense ``stage`` for torch's (same weights; fused q/k/v
    rows laid out for ``tensor`` ranks) and divide the plan's attributes by ``tensor``."""
    from mpitrain.bench.parallel_dtensor import _embedding, _linear, qkv_rows
    from mpitrain.parallel.convert import name_matches

    for name, style in _planned(stage):
        layer = stage.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        if style == "embedding":
            new: nn.Module = _embedding(layer)
        else:
            rows = qkv_rows(layer.weight.shape[0] // 3, tensor) if style == "column-qkv" else None
            new = _linear(layer, rows)
        setattr(stage.get_submodule(parent) if parent else stage, attr, new)
    for path in stage.spec.plan.divide:
        pattern, _, attr = path.rpartition(".")
        for name, module in stage.named_modules():
            if name_matches(name, pattern) and isinstance(getattr(module, attr, None), int):
                setattr(module, attr, getattr(module, attr) // tensor)
    tie_copies(stage, stage.spec.tied)


def spec_tensor_parallel(stage: Any, mesh: DeviceMesh) -> None:
    """DTensor tensor parallelism of ``stage`` (after :func:`torch_layers`) over ``mesh``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    styles = {"column": ColwiseParallel(), "column-qkv": ColwiseParallel(),
              "row": RowwiseParallel(),
              "embedding": RowwiseParallel(input_layouts=Replicate(),
                                           output_layouts=Replicate()),
              "head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                      use_local_output=False)}
    for name, style in _planned(stage):
        parallelize_module(stage.get_submodule(name), mesh, styles[style])
    tie_copies(stage, stage.spec.tied)


def spec_torch_stage(a: argparse.Namespace, pp_rank: int, pipeline: int,
                     tp_mesh: DeviceMesh | None) -> tuple[nn.Module, list[nn.Module],
                                                          Callable[[], list[Any]]]:
    """This rank's stage of ``a.model`` on torch's tensor parallelism (``tp_mesh``; None:
    dense): the module the pipeline (or the step) calls, its blocks (FSDP2's units) and a
    function giving its tied parameters (first / last stage) once the stack is applied."""
    import torch
    from mpi4py import MPI

    from mpitrain.bench.parallel_engine import bench_spec
    from mpitrain.bench.parallel_torch import logits_module

    one = MPI.COMM_SELF.Dup()  # the dense stage's tensor group (its loss is torch's here)
    stage: Any = bench_spec(a).build_stage(one, pp_rank, pipeline, torch.device("cpu"))
    torch_layers(stage, 1 if tp_mesh is None else tp_mesh.size())
    if tp_mesh is not None:
        spec_tensor_parallel(stage, tp_mesh)
    module = logits_module(stage) if stage.last else stage
    return module, list(stage.own_blocks()), stage.tied_parameters
