"""``bench parallel``'s torch-stack model on ``MPI.COMM_SELF``: the torch-layer copy of the GPT
computes what ``GPTStage`` does (dense, and split into two stages with a tied head), and its
q/k/v row order gives each tensor rank whole heads, as mpitrain's fused layout does."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch.nn import functional as F

from mpitrain.bench.parallel_dtensor import qkv_rows, torch_gpt_stage
from mpitrain.train.gpt import GPTConfig, GPTStage, qkv_init

TINY = GPTConfig(context=8, dim=16, heads=4, layers=3, seed=5)


def _batch(c: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return (torch.randint(0, c.vocab, (2, c.context), generator=g),
            torch.randint(0, c.vocab, (2, c.context), generator=g))


@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_qkv_rows_match_the_fused_tensor_parallel_layout(tensor: int) -> None:
    d = 8
    dense, split = torch.empty(3 * d, d), torch.empty(3 * d, d)
    qkv_init(1)(dense, torch.Generator().manual_seed(3))
    qkv_init(tensor)(split, torch.Generator().manual_seed(3))
    assert torch.equal(dense[qkv_rows(d, tensor)], split)


def test_torch_layers_compute_the_same_loss_and_gradients() -> None:
    x, y = _batch(TINY)
    ref = GPTStage(TINY, MPI.COMM_SELF)
    model = torch_gpt_stage(GPTStage(TINY, MPI.COMM_SELF), 1)
    ref_loss = ref(x, y)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    ref_loss.backward()  # type: ignore[no-untyped-call]
    loss.backward()  # type: ignore[no-untyped-call]
    ours = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert p.grad is not None and ours[name].grad is not None
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_two_torch_stages_equal_the_dense_model() -> None:
    x, y = _batch(TINY)
    dense = GPTStage(TINY, MPI.COMM_SELF)(x, y)
    first, last = (torch_gpt_stage(GPTStage(TINY, MPI.COMM_SELF, s, 2), 1) for s in (0, 1))
    logits = last(first(x))
    torch.testing.assert_close(F.cross_entropy(logits.flatten(0, 1), y.flatten()), dense,
                               rtol=1e-6, atol=1e-6)
