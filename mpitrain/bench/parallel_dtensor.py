"""``bench parallel``'s torch-stack methods: the same GPT on torch's own parallelism, over gloo.

``torch_stack_run`` builds the dense ``GPTStage`` of this rank's pipeline stage (the same
seeded weights as every mpitrain method), swaps its mpitrain layers for ``nn.Linear`` /
``nn.Embedding`` holding the same weights, and composes torch's stack on one
``DeviceMesh`` (pipeline x data x tensor):

- tensor: DTensor ``parallelize_module``: ``ColwiseParallel`` q/k/v and MLP-in,
  ``RowwiseParallel`` attention-out and MLP-out (Megatron's pairs), the vocabulary-split
  embedding (``RowwiseParallel`` on ``nn.Embedding``) and its tied head, whose logits stay
  split for ``loss_parallel`` (no gather, like mpitrain's vocab-parallel cross-entropy);
- data: FSDP2 (``fully_shard`` per block, then the stage: the units of mpitrain's ZeRO-3;
  under a pipeline without resharding after each forward, as torchtitan does),
  or, without sharding, FSDP2's ``replicate`` (DDP on the same machinery, DTensor-aware:
  ``torch.distributed._composable.replicate_with_fsdp``) per block and stage;
- pipeline: ``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B``/GPipe)
  over the mesh's pipeline group; the tied embedding/head gradients of the first and last
  stage are summed over a group of the two (as mpitrain's engine does).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from mpitrain.bench.allreduce import init_gloo
from mpitrain.bench.parallel_torch import LiveSaved, Run, gpt_config, local, model_memory

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

    from mpitrain.train.gpt import Block, GPTStage


def _linear(layer: nn.Module, rows: list[int] | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer``'s (dense) weight and bias, rows permuted by ``rows``."""
    import torch
    from torch import nn

    w = cast("torch.Tensor", layer.weight)
    b = cast("torch.Tensor | None", layer.bias)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w if rows is None else w[rows])
        if b is not None:
            lin.bias.copy_(b if rows is None else b[rows])
    return lin


def _embedding(layer: nn.Module) -> nn.Embedding:
    """An ``nn.Embedding`` holding ``layer``'s (dense) weight."""
    import torch
    from torch import nn

    w = cast("torch.Tensor", layer.weight)
    emb = nn.Embedding(w.shape[0], w.shape[1])
    with torch.no_grad():
        emb.weight.copy_(w)
    return emb


def qkv_rows(dim: int, tensor: int) -> list[int]:
    """Row order taking the dense [q; k; v] weight to ``tensor`` slices of (q, k, v) heads each,
    so that ``ColwiseParallel``'s even split gives each rank whole heads (``qkv_init``'s layout)."""
    part = dim // tensor
    return [w * dim + r * part + i for r in range(tensor) for w in range(3) for i in range(part)]


def _torch_block(block: Block, tensor: int) -> None:
    """Swap the block's mpitrain layers for ``nn.Linear`` (same weights); heads become local."""
    d = block.head_dim * block.heads
    block.qkv = _linear(block.qkv, qkv_rows(d, tensor))  # type: ignore[assignment]
    block.proj = _linear(block.proj)  # type: ignore[assignment]
    block.fc = _linear(block.fc)  # type: ignore[assignment]
    block.out = _linear(block.out)  # type: ignore[assignment]
    block.heads //= tensor


def torch_gpt_stage(dense: GPTStage, tensor: int) -> nn.Module:
    """The dense stage on torch layers (taking over ``dense``'s blocks and norms), its q/k/v
    rows laid out for ``tensor`` ranks."""
    return _stage_class()(dense, tensor)


def _stage_class() -> type[nn.Module]:
    """``TorchGPTStage`` (a class built on first use: torch loads in the workers only)."""
    from torch import nn
    from torch.distributed.tensor import DTensor, Replicate
    from torch.nn import functional as F

    class TorchGPTStage(nn.Module):
        """A dense GPT stage on torch layers: tokens (first) or activations in; activations or
        the logits (last, tied head; a vocabulary-split DTensor under tensor parallelism) out."""

        def __init__(self, dense: GPTStage, tensor: int) -> None:
            super().__init__()
            self.first, self.last = dense.first, dense.last
            if self.first:
                self.tok = _embedding(dense.tok)
                self.pos = dense.pos
            self.blocks = dense.blocks
            for block in self.blocks.values():
                _torch_block(cast("Block", block), tensor)
            if self.last:
                self.ln_f = dense.ln_f
                if dense.tied_across_stages:
                    self.head = _embedding(dense.head)

        def head_weight(self) -> torch.Tensor:
            return (self.head if hasattr(self, "head") else self.tok).weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x
            if self.first:
                h = self.tok(x.long()) + self.pos[: x.shape[1]]
            for block in self.blocks.values():
                h = block(h)
            if not self.last:
                return h
            h = self.ln_f(h)
            w = self.head_weight()
            if isinstance(w, DTensor):  # replicated activations x vocabulary-split weight
                h = DTensor.from_local(h, w.device_mesh, [Replicate()], run_check=False)
            return F.linear(h, w)

    return TorchGPTStage


def tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """DTensor tensor parallelism of a ``TorchGPTStage`` over the 1-D ``mesh``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {"qkv": ColwiseParallel(), "proj": RowwiseParallel(),
            "fc": ColwiseParallel(), "out": RowwiseParallel()}
    for block in cast("nn.ModuleDict", model.blocks).values():
        parallelize_module(block, mesh, plan)  # type: ignore[arg-type]
    vocab = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for name in ("tok", "head"):  # the head is only a weight: its logits are split (forward)
        if hasattr(model, name):
            parallelize_module(getattr(model, name), mesh, vocab)


def _mesh(comm: MPI.Intracomm, tensor: int, pipeline: int) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    shape = (pipeline, comm.size // (tensor * pipeline), tensor)
    return init_device_mesh("cpu", shape, mesh_dim_names=("pp", "dp", "tp"))


def _ends_group(mesh: DeviceMesh) -> Any:
    """Collective: this rank's group of the first and last stage at its (data, tensor) place
    (None in the middle stages and without a pipeline)."""
    import torch.distributed as dist

    ranks = mesh.mesh
    p, d, t = ranks.shape
    if p == 1:
        return None
    mine = None
    for i in range(d):
        for j in range(t):  # every rank creates every group, in the same order
            pair = [int(ranks[0, i, j]), int(ranks[p - 1, i, j])]
            group = dist.new_group(pair)
            mine = group if dist.get_rank() in pair else mine
    return mine


def _sum_tied_(w: torch.Tensor, group: Any) -> None:
    """Collective (``group``): sum the gradient's local shard of the tied embedding/head."""
    import torch.distributed as dist

    assert w.grad is not None
    g = local(w.grad)
    buf = g.contiguous()
    dist.all_reduce(buf, group=group)
    if buf.data_ptr() != g.data_ptr():
        g.copy_(buf)


def _as_params(model: nn.Module) -> None:
    """Lay each DTensor gradient out as its parameter (the embedding's comes back replicated
    from DTensor's embedding backward: slice it, no communication)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def torch_stack_run(a: argparse.Namespace, comm: MPI.Intracomm, tensor: int, pipeline: int,
                    fsdp: bool, schedule: str) -> Run:
    """Collective: this rank's GPT stage on torch's stack (module docstring) and its AdamW."""
    import torch
    import torch.distributed as dist
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import loss_parallel
    from torch.nn import functional as F

    from mpitrain.train.gpt import GPTStage

    init_gloo(comm)
    mesh = _mesh(comm, tensor, pipeline)
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    d = mesh["dp"].size()
    if a.model == "gpt":
        one = cast("MPI.Intracomm", comm.Split(comm.rank, 0))  # the dense stage's tensor group
        model = torch_gpt_stage(GPTStage(gpt_config(a, False), one, pp_rank, pipeline), tensor)
        one.Free()
        if tensor > 1:
            tensor_parallel(model, mesh["tp"])
        blocks = list(cast("nn.ModuleDict", model.blocks).values())

        def tied() -> list[Any]:
            return [cast("Any", model).head_weight()]
    else:  # a ParallelSpec: its plan on DTensor (parallel_dtensor_spec)
        from mpitrain.bench.parallel_dtensor_spec import spec_torch_stage

        model, blocks, tied = spec_torch_stage(a, pp_rank, pipeline,
                                               mesh["tp"] if tensor > 1 else None)
    if fsdp or d > 1:  # FSDP2, or its replicate (DDP on FSDP2's machinery)
        # under a pipeline, keep the gathered parameters from each micro-batch's forward to
        # the last backward (torchtitan's default): else every micro-batch gathers them twice
        wrap = partial(fully_shard, reshard_after_forward=pipeline == 1) if fsdp else replicate
        for block in blocks:
            wrap(block, mesh=mesh["dp"])
        wrap(model, mesh=mesh["dp"])
    ends = _ends_group(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    split = contextlib.nullcontext if tensor == 1 else loss_parallel

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten().long())

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(local(loss.detach()))

    if pipeline > 1:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(model, pp_rank, pipeline, torch.device("cpu"),
                              group=mesh["pp"].get_group())
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = kind(stage, n_microbatches=a.micro_batches, loss_fn=loss_fn)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            losses: list[torch.Tensor] = []
            if pp_rank == 0:
                sched.step(x)
            elif pp_rank == pipeline - 1:
                sched.step(target=y, losses=losses)
            else:
                sched.step()
            vals = [float(local(v.detach())) for v in losses]  # the last stage's micro-batches
            return sum(vals) / len(vals) if vals else math.nan

    def train(tokens: torch.Tensor) -> tuple[float, int, float]:
        mine = tokens.chunk(d)[dp_rank]
        live = LiveSaved(model)
        with split(), torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
            loss = step(mine[:, :-1], mine[:, 1:])
        _as_params(model)
        if ends is not None:  # the tied embedding and head (same layout at both ends)
            for w in tied():
                _sum_tied_(w, ends)
        return math.nan, live.peak, loss

    def update() -> None:
        opt.step()
        opt.zero_grad()

    parts = [f"pipeline {pipeline} ({schedule}, torch.distributed.pipelining)"] * (pipeline > 1)
    parts += [f"data {d} ({'FSDP2 fully_shard' if fsdp else 'replicate'})"]
    parts += [f"tensor {tensor} (DTensor parallelize_module)"] * (tensor > 1)
    describe = f"torch stack on a gloo DeviceMesh: {' x '.join(parts)}"
    return Run(train, update, lambda: model_memory(list(model.parameters()), opt), describe,
               dist.destroy_process_group)
