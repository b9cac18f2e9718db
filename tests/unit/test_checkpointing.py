"""Activation checkpointing (``mpitrain.parallel.checkpointing``): none, full and selective
train the GPT alike (loss and gradients bitwise, one process), keep fewer bytes for backward
(counted by the pipeline engine), leave names alone; misuse is refused."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpitrain.errors import ConfigError
from mpitrain.parallel.checkpointing import (
    apply_activation_checkpointing,
    check_zero3_units,
    checkpointing_mode,
    declared_units,
    remove_activation_checkpointing,
    zero3_units_around,
)
from mpitrain.parallel.grid import Grid
from mpitrain.parallel.pipeline import PipelineEngine
from mpitrain.train.gpt import GPTConfig, GPTStage


def _step(mode: str) -> tuple[float, dict[str, torch.Tensor], int, float, list[str]]:
    c = GPTConfig(context=32, dim=64, heads=4, layers=3, seed=3, activation_checkpointing=mode)
    grid = Grid.create(MPI.COMM_SELF, tensor=1, pipeline=1)
    stage = GPTStage(c, grid.tp_comm)
    assert {checkpointing_mode(b) for b in stage.blocks.values()} == {mode}
    eng = PipelineEngine(stage, grid, micro_batches=2, measure_memory=True)
    w = torch.randint(0, c.vocab, (4, c.context + 1), generator=torch.Generator().manual_seed(1))
    loss = eng.train_step(w[:, :-1], w[:, 1:])
    grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    ev = eng.eval_step(w[:, :-1], w[:, 1:])
    grid.free()
    return loss, grads, eng.stats.peak_activation_bytes, ev, list(stage.state_dict())


def test_modes_train_alike_and_full_keeps_less() -> None:
    runs = {mode: _step(mode) for mode in ("none", "full", "selective")}
    loss, grads, peak, ev, keys = runs["none"]
    for mode in ("full", "selective"):
        l2, g2, _p2, e2, k2 = runs[mode]
        assert (l2, e2, k2) == (loss, ev, keys), mode  # names unchanged: checkpoints resume
        assert set(g2) == set(grads) and all(torch.equal(g2[k], grads[k]) for k in grads), mode
    # bytes saved for backward: full keeps each block's input, selective its matmul and
    # attention outputs too (counted through the engine's saved-tensor hooks)
    assert runs["full"][2] < runs["selective"][2] < peak, {m: r[2] for m, r in runs.items()}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class _Declared(_Net):
    def activation_checkpoint_units(self) -> list[nn.Module]:
        return list(self.blocks)


def test_declared_units_and_refusals() -> None:
    net = _Declared()
    x = torch.randn(3, 4)
    want = net(x)
    assert declared_units(net, "pkg.mod:factory", "none") == []
    units = declared_units(net, "pkg.mod:factory", "selective")
    assert units == list(net.blocks) and checkpointing_mode(net.blocks[0]) == "selective"
    assert torch.equal(net(x), want)
    with pytest.raises(ValueError, match="checkpointed already"):
        apply_activation_checkpointing(units, "full")
    with pytest.raises(ConfigError, match=r"--model pkg.mod:factory made a _Net, which declares "
                                          r"no units.*HINT: give it a method "
                                          r"activation_checkpoint_units"):
        declared_units(_Net(), "pkg.mod:factory", "full")
    with pytest.raises(ValueError, match="use one of none, full, selective"):
        apply_activation_checkpointing(units, "some")
    # ZeRO-3: a gather unit inside a checkpointed module is refused; the module itself is fine
    # (the trainer's units: the default ones, each checkpointed block replacing those inside)
    assert zero3_units_around(net, units) == units
    check_zero3_units(net, units)
    with pytest.raises(ConfigError, match=r"ZeRO-3 unit 'blocks.0.0' lies inside the "
                                          r"activation-checkpointed 'blocks.0'.*HINT"):
        check_zero3_units(net, [net.blocks[0][0]])
    remove_activation_checkpointing(units)
    assert checkpointing_mode(net.blocks[0]) == "none"
    check_zero3_units(net, [net.blocks[0][0]])
