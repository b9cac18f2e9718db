"""Model specs in one process: plans that do not fit are refused by name; a spec's dense stage
runs the model as ``transformers`` does; stages are built without the whole model."""

from __future__ import annotations

import re

import pytest
import torch
from mpi4py import MPI

from mpitrain.config import TrainConfig
from mpitrain.parallel.convert import TensorPlan, check_plan
from mpitrain.parallel.spec import ParallelSpec, build_stage, check_spec
from mpitrain.train.hf import gpt2_spec, hf_reference_loss, llama_spec
from tests.mpi.scenarios.user_spec import PLAN, TinyLM, spec

CFG = TrainConfig(model="llama", hidden=32, heads=4, layers=2, context=16)


def _bad(plan: TensorPlan, size: int = 2) -> str:
    with torch.device("meta"):
        model = TinyLM(32, 4, 2, 16)
    with pytest.raises(ValueError) as err:
        check_plan(model, plan, size)
    return str(err.value)


def test_plans_that_do_not_fit_are_refused_by_name() -> None:
    assert "'blocks.*.fc9', which matches no module" in _bad(
        TensorPlan({**PLAN.layers, "blocks.*.fc9": "row"}))
    assert "'blocks.0.norm1' column, but it is a LayerNorm, not a linear layer" in _bad(
        TensorPlan({"blocks.*.norm1": "column"}))
    assert "'blocks.0.qkv' column-qkv, but its 96 output features do not split in 3 blocks " \
           "over 64 ranks" in _bad(TensorPlan({"blocks.*.qkv": "column-qkv"}), 64)
    assert "'embed.tok' embedding, but its vocabulary of 256 does not split over 3" in _bad(
        TensorPlan({"embed.tok": "embedding"}), 3)
    assert "divides 'blocks.0.width', which is not an integer attribute of its Block" in _bad(
        TensorPlan({}, divide=("blocks.*.width",)))
    assert "divides 'blocks.0.heads' = 4, which does not split over 8" in _bad(
        TensorPlan({}, divide=("blocks.*.heads",)), 8)
    assert "the unknown style 'diagonal'" in _bad(TensorPlan({"head": "diagonal"}))
    assert "the model's 2 key/value heads do not split over 4" in _bad(
        TensorPlan({}, widths={"key/value heads": 2}), 4)
    good = spec(CFG.replace(pipeline_stages=2))
    for points, want in ((("norm",), "split point 'norm' is not one of the blocks"),
                         (("blocks.0",), "split point 'blocks.0' is not one of the blocks"),
                         (("blocks.1", "blocks.1"), "make 3 stages, not 2")):
        bad = ParallelSpec(**{**good.__dict__, "split_points": points})
        with pytest.raises(ValueError, match=re.escape(want)):
            check_spec(bad, 1, 2)
    with pytest.raises(ValueError, match=r"tied parameter 'head\.bias' is not a parameter"):
        check_spec(ParallelSpec(**{**good.__dict__, "tied": {"head.bias": "embed.tok.weight"},
                                   "split_points": ()}), 1, 2)


@torch.no_grad()
def test_hugging_face_specs_run_the_model_as_transformers_does() -> None:
    """The dense stage's loss is the loss transformers computes with the same weights (GPT-2's
    Conv1D transposed), and a pipeline of two stages gives the same loss; the stages were
    built on the meta device: no rank builds another stage's blocks."""
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    for make in (llama_spec, gpt2_spec):
        s = make(CFG)
        dense = build_stage(s, MPI.COMM_SELF)
        loss = float(dense(tokens[:, :-1], tokens[:, 1:]))
        assert loss == pytest.approx(hf_reference_loss(s, dense, tokens), rel=1e-6)
        first, last = build_stage(s, MPI.COMM_SELF, 0, 2), build_stage(s, MPI.COMM_SELF, 1, 2)
        assert float(last(first(tokens[:, :-1]), tokens[:, 1:])) == pytest.approx(loss, rel=1e-6)
        names = {n for n, _ in first.named_parameters()}
        assert not any(".1." in n for n in names) and "lm_head.weight" not in names
        # the tied head (GPT-2) starts as a copy of the first stage's embedding
        for target, source in last.tied_names().items():
            assert torch.equal(last.get_parameter(target), first.get_parameter(source))


def test_sequence_parallel_needs_a_spec_that_splits_the_sequence() -> None:
    from mpitrain.errors import ConfigError
    from mpitrain.train.models import resolve_model

    cfg = TrainConfig(model="tests.mpi.scenarios.user_spec:spec", tensor_parallel=2,
                      sequence_parallel=True)
    with pytest.raises(ConfigError, match="does not split the sequence"):
        resolve_model(cfg)
    with pytest.raises(ConfigError, match="stages are not compiled yet"):
        resolve_model(cfg.replace(sequence_parallel=False, compile="regions"))
    assert llama_spec(CFG.replace(sequence_parallel=True, tensor_parallel=2)).sequence_parallel
