"""Model chunks (virtual stages) on one rank: ``StageChunks`` joins the chunks' parameter lists
under the container's names; the engine refuses chunks it cannot route and runs one chunk
through ``interleaved`` as 1F1B (serial, ``MPI.COMM_SELF``; the multi-rank checks are in
tests/mpi/scenarios/model_parallel.py)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpitrain.errors import ConfigError
from mpitrain.grad.parallel import DataParallel
from mpitrain.parallel.chunks import StageChunks
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import PipelineEngine
from mpitrain.train.gpt import GPTConfig, GPTStage

CFG = GPTConfig(context=8, dim=16, heads=2, layers=4, sequence_parallel=False, seed=3)


def _chunks(stages: int = 2) -> StageChunks:
    """Rank 0's chunks of a pipeline of one rank cut into ``stages`` global stages."""
    return StageChunks(GPTStage(CFG, MPI.COMM_SELF, k, stages) for k in range(stages))


def test_chunks_join_their_lists_under_the_containers_names() -> None:
    chunks = _chunks()
    names = {id(p): n for n, p in chunks.named_parameters()}
    assert [names[id(p)] for p in chunks.tied_parameters()] == ["0.tok.weight", "1.head.weight"]
    assert chunks.tied_names() == {"1.head.weight": "tok.weight"}
    rules = chunks.merge_rules()
    assert set(rules) <= set(names.values()) and "0.blocks.0.ln1.weight" in rules
    assert "1.blocks.3.ln1.weight" in rules  # the GPT's global block names, one prefix
    assert chunks.zero3_units() == [*chunks[0].zero3_units(), *chunks[1].zero3_units()]
    assert chunks.sequence_parallel_parameters() == []
    x = torch.randn(2, CFG.context, CFG.dim)
    y = torch.randint(0, CFG.vocab, (2, CFG.context))
    torch.testing.assert_close(chunks(x, y, chunk=1), chunks[1](x, y))


def test_engine_refuses_chunks_it_cannot_route() -> None:
    grid = Grid.create(MPI.COMM_SELF, node_index=0)
    try:
        with pytest.raises(ConfigError, match=r"2 chunks on a pipeline of one stage.*HINT"):
            PipelineEngine(_chunks(), grid, micro_batches=2, schedule="interleaved")
        plain = [GPTStage(CFG, MPI.COMM_SELF)]
        dp = DataParallel(plain[0], comm=grid.dp_comm)
        with pytest.raises(ConfigError, match=r"plain list of chunks.*HINT: put the chunks"):
            PipelineEngine(plain, grid, micro_batches=2, data_parallel=dp)
        with pytest.raises(ConfigError, match="no chunks"):
            PipelineEngine([], grid, micro_batches=2)
    finally:
        grid.free()


def test_one_chunk_interleaved_is_the_plain_stage() -> None:
    grid = Grid.create(MPI.COMM_SELF, node_index=0)
    x = torch.randint(0, CFG.vocab, (4, CFG.context + 1),
                      generator=torch.Generator().manual_seed(1))
    out = []
    for chunked in (False, True):
        stage = GPTStage(CFG, MPI.COMM_SELF)
        dp = DataParallel(StageChunks([stage]) if chunked else stage, comm=grid.dp_comm)
        eng = PipelineEngine(dp.module if chunked else stage, grid, micro_batches=2,
                             schedule="interleaved" if chunked else "1f1b", data_parallel=dp)
        loss = eng.train_step(x[:, :-1], x[:, 1:])
        assert eng.stats.peak_in_flight == 1
        out.append((loss, [p.grad.clone() for p in stage.parameters()],
                    eng.eval_step(x[:, :-1], x[:, 1:])))
        eng.close()
    (l0, g0, e0), (l1, g1, e1) = out
    assert l0 == l1 and e0 == e1 and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    grid.free()
