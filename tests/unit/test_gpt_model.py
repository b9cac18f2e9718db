"""The built-in GPT on ``MPI.COMM_SELF`` with tiny sizes: the stage split, the parameter
count, the loss at init, the fused q/k/v layout, a two-stage model equal to the dense one and
the merge of its stages' checkpoints back into the dense ``state_dict``."""

from __future__ import annotations

import math

import pytest
import torch
from mpi4py import MPI

from mpitrain.checkpoint.reshard import join, merge_parallel
from mpitrain.errors import CheckpointError
from mpitrain.train.gpt import GPTConfig, GPTStage, qkv_init, stage_layers

TINY = GPTConfig(context=8, dim=16, heads=2, layers=3, seed=5)


def _batch(c: GPTConfig, batch: int = 2, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, c.vocab, (batch, c.context), generator=g)
    y = torch.randint(0, c.vocab, (batch, c.context), generator=g)
    return x, y


@pytest.mark.parametrize("layers", range(1, 10))
def test_stage_layers_cover_contiguously(layers: int) -> None:
    for stages in range(1, layers + 1):
        parts = [stage_layers(layers, stages, s) for s in range(stages)]
        assert [i for r in parts for i in r] == list(range(layers)), (stages, parts)
        sizes = [len(r) for r in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, (stages, sizes)
        assert sizes == sorted(sizes, reverse=True), sizes  # the first stages take the extras


@pytest.mark.parametrize(
    "c", [TINY, GPTConfig(context=4, dim=8, heads=1, layers=1), GPTConfig(dim=32, layers=2)]
)
def test_parameters_count(c: GPTConfig) -> None:
    model = GPTStage(c, MPI.COMM_SELF)
    assert c.parameters_count() == sum(p.numel() for p in model.parameters())


def test_loss_at_init_is_uniform() -> None:
    model = GPTStage(TINY, MPI.COMM_SELF)
    x, y = _batch(TINY, batch=4)
    with torch.no_grad():
        loss = model(x, y)
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.1, loss.item()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_layout_joins_back(tp: int) -> None:
    d = 8
    dense, split = torch.empty(3 * d, d), torch.empty(3 * d, d)
    qkv_init(1)(dense, torch.Generator().manual_seed(3))
    qkv_init(tp)(split, torch.Generator().manual_seed(3))
    slices = list(split.chunk(tp, dim=0))
    assert torch.equal(join(slices, 0, interleave=3), dense)
    if tp > 1:  # rank 0's slice holds its q, k and v heads, not the first 3d/tp rows
        assert not torch.equal(slices[0], dense.chunk(tp)[0])


def _two_stages(c: GPTConfig) -> tuple[GPTStage, GPTStage]:
    return GPTStage(c, MPI.COMM_SELF, 0, 2), GPTStage(c, MPI.COMM_SELF, 1, 2)


def test_two_stages_equal_the_dense_model() -> None:
    dense = GPTStage(TINY, MPI.COMM_SELF)
    s0, s1 = _two_stages(TINY)
    assert list(s0.blocks) == ["0", "1"] and list(s1.blocks) == ["2"]
    assert not hasattr(s0, "ln_f") and not hasattr(s1, "tok")
    assert torch.equal(s1.head.weight, dense.tok.weight)  # initialised like the embedding
    assert torch.equal(s0.tok.weight, dense.tok.weight)
    assert [p.data_ptr() for p in s1.tied_parameters()] == [s1.head.weight.data_ptr()]
    assert dense.tied_parameters() == []
    x, y = _batch(TINY)
    with torch.no_grad():
        h = s0(x)
        assert h.shape == (2, TINY.context, TINY.dim)
        assert torch.equal(s1(h, y), dense(x, y))
    with pytest.raises(ValueError, match="targets"):
        s1(h)


def test_merge_rules() -> None:
    s0, s1 = _two_stages(TINY)
    r0, r1 = s0.merge_rules(), s1.merge_rules()
    assert set(r0) == {n for n, _ in s0.named_parameters()}
    assert set(r1) == {n for n, _ in s1.named_parameters()}
    assert r1["head.weight"] == [0, 1, True]
    assert [n for n, r in {**r0, **r1}.items() if r[2]] == ["head.weight"]
    assert r0["tok.weight"] == [0, 1, False] and r0["pos"] == [None, 1, False]
    for b, rules in (("0", r0), ("1", r0), ("2", r1)):
        p = f"blocks.{b}."
        assert rules[p + "qkv.weight"] == [0, 3, False]
        assert rules[p + "qkv.bias"] == [0, 3, False]
        assert rules[p + "fc.weight"] == [0, 1, False] and rules[p + "fc.bias"] == [0, 1, False]
        for row in ("proj", "out"):
            assert rules[p + row + ".weight"] == [1, 1, False]
            assert rules[p + row + ".bias"] == [None, 1, False]
        for ln in ("ln1", "ln2"):
            assert rules[p + ln + ".weight"] == [None, 1, False]
            assert rules[p + ln + ".bias"] == [None, 1, False]
    assert r1["ln_f.weight"] == [None, 1, False] and r1["ln_f.bias"] == [None, 1, False]


def test_merge_parallel_gives_the_dense_state_dict() -> None:
    dense = GPTStage(TINY, MPI.COMM_SELF).state_dict()
    s0, s1 = _two_stages(TINY)
    merged = merge_parallel([s0.merge_rules(), s1.merge_rules()],
                            [[s0.state_dict()], [s1.state_dict()]])
    assert set(merged) == set(dense)
    for k in dense:
        assert torch.equal(merged[k], dense[k]), k
    # the dense model loads it strictly
    GPTStage(TINY, MPI.COMM_SELF).load_state_dict(merged, strict=True)


def test_merge_parallel_names_a_missing_parameter() -> None:
    s0, s1 = _two_stages(TINY)
    broken = s1.state_dict()
    del broken["blocks.2.proj.weight"]
    with pytest.raises(CheckpointError) as info:
        merge_parallel([s0.merge_rules(), s1.merge_rules()], [[s0.state_dict()], [broken]])
    msg = str(info.value)
    assert "'blocks.2.proj.weight'" in msg and "HINT" in msg, msg
    # the dropped head is not needed
    no_head = s1.state_dict()
    del no_head["head.weight"]
    merge_parallel([s0.merge_rules(), s1.merge_rules()], [[s0.state_dict()], [no_head]])
