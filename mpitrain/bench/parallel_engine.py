"""``bench parallel``'s mpitrain side: the model from the registry, split on mpitrain's grid.

Every method builds this rank's stage as the trainer does (``MODELS[name](cfg)`` and
:func:`mpitrain.train.models.build_spec_stage`: the plan and split checked on the meta device,
then ``spec.build_stage(tp, stage, stages, device)``; with ``v`` virtual stages the ``v``
chunks of global stages ``c * P + rank``), wraps it in the replicas' exchange (``DataParallel``
or ZeRO's ``ShardedDataParallel``) and drives it with :class:`PipelineEngine` (one
micro-batch per step without a pipeline) and AdamW.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from mpitrain.bench.parallel_torch import Run, model_memory

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI

    from mpitrain.config import TrainConfig
    from mpitrain.parallel.spec import StageBuilder

#: ``--model`` choices: the registry's language models
LANGUAGE_MODELS = ("gpt", "llama", "gpt2")


def bench_config(a: argparse.Namespace, sequence_parallel: bool = False) -> TrainConfig:
    """The training config the benchmark's model is sized by (``--dim`` is the width)."""
    from mpitrain.config import TrainConfig

    return TrainConfig(model=a.model, hidden=a.dim, heads=a.heads, layers=a.layers,
                       context=a.context, sequence_parallel=sequence_parallel, seed=0)


def bench_spec(a: argparse.Namespace, sequence_parallel: bool = False) -> StageBuilder:
    """The registry's spec of ``--model`` (``gpt``: the built-in GPT; ``llama``, ``gpt2``: the
    Hugging Face models, built from a config in code)."""
    from mpitrain.train.models import MODELS

    spec: StageBuilder = MODELS[a.model](bench_config(a, sequence_parallel))
    return spec


def dense_numel(a: argparse.Namespace) -> int:
    """Parameters of the dense model (tied ones once), counted on the meta device."""
    import torch

    spec: Any = bench_spec(a)
    if not hasattr(spec, "build"):  # the built-in GPT
        return int(spec.config.parameters_count())
    with torch.device("meta"):
        return sum(p.numel() for p in spec.build().parameters())


def engine_run(a: argparse.Namespace, comm: MPI.Intracomm, tensor: int, pipeline: int,
               virtual: int, schedule: str, shard: int, sequence_parallel: bool) -> Run:
    """Collective: the grid, this rank's stage (or ``virtual`` chunks) of the registry's model,
    the replicas' exchange (ZeRO stage ``shard``, or DataParallel), the engine and AdamW."""
    import torch
    from mpi4py import MPI

    from mpitrain.grad.parallel import DataParallel
    from mpitrain.grad.zero.wrapper import ShardedDataParallel
    from mpitrain.parallel.grid import Grid
    from mpitrain.parallel.pipeline import PipelineEngine
    from mpitrain.runtime.world import World
    from mpitrain.train.grid import GridExchange
    from mpitrain.train.models import build_spec_stage

    world = World.create(comm)
    node = world.local_rank if a.placement == "across" else None
    grid = Grid.create(comm, tensor=tensor, pipeline=pipeline, node_index=node)
    spans = comm.allreduce(len(set(grid.tp_comm.allgather(world.node_index))), op=MPI.MAX)
    given = "local rank" if node is not None else "COMM_TYPE_SHARED"
    where = "ACROSS" if spans > 1 else "inside"
    describe = (f"{grid.describe()} (node_index = {given}); on the {world.num_nodes} real "
                f"node(s) tensor groups are {where} nodes")
    spec = bench_spec(a, sequence_parallel)
    stage: Any = build_spec_stage(spec, grid, world, torch.device("cpu"), virtual)
    world.free()
    dp: Any = None
    if shard:  # ZeRO over the replicas, as the trainer composes it (train/grid.py)
        dp = ShardedDataParallel(stage, comm=grid.dp_comm, stage=shard,
                                 units=stage.zero3_units())
    elif grid.data > 1:
        dp = DataParallel(stage, comm=grid.dp_comm)
    engine = PipelineEngine(stage, grid, micro_batches=a.micro_batches if pipeline > 1 else 1,
                            schedule=schedule, data_parallel=dp,
                            tied=stage.tied_parameters(),
                            sequence_parallel_params=stage.sequence_parallel_parameters(),
                            measure_memory=True, eval_through_exchange=shard == 3)
    exchange = GridExchange(stage, engine, {})  # steps ZeRO's shards, sums tied gradients
    held = list(stage.parameters()) + (list(dp.shards) if shard else [])
    opt = torch.optim.AdamW(dp.parameters() if shard else stage.parameters(), lr=1e-4)

    def train(tokens: torch.Tensor) -> tuple[float, int, float]:
        mine = tokens.chunk(grid.data)[grid.dp_rank]
        loss = engine.train_step(mine[:, :-1], mine[:, 1:])
        st = engine.stats
        return st.wait_seconds / st.step_seconds, st.peak_activation_bytes, loss

    def update() -> None:
        exchange.step(opt)
        exchange.zero_grad()

    def close() -> None:
        engine.close()
        grid.free()

    if virtual > 1:
        describe += f"; {virtual} virtual stages (chunks) per rank"
    return Run(train, update, lambda: model_memory(held, opt), describe, close)
