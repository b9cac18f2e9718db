"""Serial tests of ZeRO sharding: layout math, consolidation of simulated ranks, one rank."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from mpitrain.checkpoint.shards import consolidate
from mpitrain.errors import ConfigError
from mpitrain.grad.zero.layout import plan_layout


def shapes() -> tuple[list[str], list[tuple[int, ...]]]:
    return ["a.w", "a.b", "b.w", "b.b"], [(7, 3), (7,), (5, 7), (5,)]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("bucket_bytes", [1, 40, 200, 10**6])
def test_layout_pads_each_bucket_and_covers_every_element(ranks: int, bucket_bytes: int) -> None:
    names, shp = shapes()
    lay = plan_layout(names, shp, ranks, bucket_bytes)
    assert lay.numel == 21 + 7 + 35 + 5
    # reverse registration order (autograd's), end to end without gaps
    assert [lay.full_range(i) for i in (3, 2, 1, 0)] == [(0, 5), (5, 40), (40, 47), (47, 68)]
    size = max(ranks, bucket_bytes // 4 // ranks * ranks)
    for b in lay.buckets:
        assert b.padded(ranks) <= size and b.padded(ranks) % ranks == 0
        owned = [lay.shard_range(b.index, r) for r in range(ranks)]
        assert owned[0][0] == b.offset and owned[-1][1] == b.offset + b.padded(ranks)
        assert all(x[1] == y[0] for x, y in itertools.pairwise(owned))
    assert lay.total - lay.numel < ranks  # padding: the last bucket only
    assert lay.shard_numel() * ranks == lay.total
    assert len(lay.buckets) == -(-lay.numel // size)
    # every parameter is cut into consecutive pieces covering it exactly
    for i, s in enumerate(lay.slots):
        pieces = lay.pieces(i)
        assert sum(n for _b, _st, n in pieces) == s.numel
        at = s.offset
        for b, start, n in pieces:
            assert lay.buckets[b].offset + start == at and i in lay.buckets[b].params
            at += n


def simulate(ranks: int) -> tuple[dict[str, torch.Tensor], dict[str, object], list[dict]]:
    """Cut a full state into ``ranks`` payloads the way ShardedDataParallel saves them."""
    names, shp = shapes()
    lay = plan_layout(names, shp, ranks, 40)
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=g) for n, s in zip(names, shp, strict=True)}
    moments = {n: torch.randn(s, generator=g) for n, s in zip(names, shp, strict=True)}
    full, mom = torch.zeros(lay.total), torch.zeros(lay.total)
    for i, s in enumerate(lay.slots):
        a, e = lay.full_range(i)
        full[a:e] = params[s.name].reshape(-1)
        mom[a:e] = moments[s.name].reshape(-1)
    payloads = []
    for r in range(ranks):
        flat, state = {}, {}
        for b in range(len(lay.buckets)):
            lo, hi = lay.shard_range(b, r)
            flat[b] = full[lo:hi].clone()
            state[b] = {"step": torch.tensor(3.0), "m": mom[lo:hi].clone()}
        payloads.append({"flat": flat, "optim": {"state": state, "param_groups": [{"lr": 1}]},
                         "buffers": {"bn.running_mean": torch.ones(2)} if r == 0 else {},
                         "extra": {"step": 3}})
    doc = {"layout": lay.manifest(), "state_keys": [*names, "bn.running_mean"]}
    return params, {"moments": moments, "doc": doc}, payloads


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_consolidate_drops_padding_and_splits_per_parameter(ranks: int) -> None:
    params, aux, payloads = simulate(ranks)
    full = consolidate(aux["doc"], payloads)  # type: ignore[arg-type]
    assert list(full["model"]) == [*params, "bn.running_mean"]
    for n, t in params.items():
        assert torch.equal(full["model"][n], t)
        assert torch.equal(full["optim_state"][n]["m"], aux["moments"][n])  # type: ignore[index]
        assert full["optim_state"][n]["step"] == 3.0
    steps = [full["optim_state"][n]["step"] for n in params]
    assert len({id(s) for s in steps}) == len(steps)  # Adam adds to `step` in place
    assert full["extra"] == {"step": 3}


def test_one_rank_stages_equal_plain_training(tmp_path: Path) -> None:
    from mpi4py import MPI

    from mpitrain.grad.zero import ShardedDataParallel, load_sharded, save_sharded

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(3):
        ref_opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        ref_opt.step()
    for stage in (1, 2):
        model = ShardedDataParallel(copy.deepcopy(net), comm=MPI.COMM_SELF, stage=stage,
                                    bucket_mb=0.0001)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            ((model(x) - y) ** 2).mean().backward()
            model.synchronize()
            model.step(opt)
            model.zero_grad()
        for a, b in zip(model.module.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        save_sharded(model, opt, tmp_path / f"s{stage}")
        again = ShardedDataParallel(copy.deepcopy(net), comm=MPI.COMM_SELF, stage=3 - stage)
        opt2 = torch.optim.Adam(again.parameters(), lr=0.01)
        load_sharded(again, opt2, tmp_path / f"s{stage}")
        for a, b in zip(again.module.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b)


def test_refuses_what_it_cannot_shard() -> None:
    from mpi4py import MPI

    from mpitrain.grad.zero import ShardedDataParallel

    with pytest.raises(ConfigError, match="stage 4"):
        ShardedDataParallel(nn.Linear(2, 2), comm=MPI.COMM_SELF, stage=4)
    with pytest.raises(ConfigError, match="not available with sharding"):
        ShardedDataParallel(nn.Linear(2, 2), comm=MPI.COMM_SELF, stage=2, compression="bf16-ef")
    with pytest.raises(ConfigError, match="float64"):
        ShardedDataParallel(nn.Linear(2, 2).double(), comm=MPI.COMM_SELF, stage=1)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"exchange": "local-sgd"}, "--exchange local-sgd"),
        ({"compression": "fp16-ef"}, "--compression fp16-ef"),
    ],
)
def test_trainer_refuses_what_it_would_get_wrong(changes: dict[str, object], named: str) -> None:
    from types import SimpleNamespace

    from mpitrain.config import TrainConfig
    from mpitrain.grad.zero.spec import check_trainer_options

    cfg = TrainConfig().replace(shard="gradients", **changes)
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="HINT") as err:
        check_trainer_options(ctx)  # type: ignore[arg-type]
    assert named in str(err.value) and "--shard gradients" in str(err.value)
    ok = SimpleNamespace(cfg=TrainConfig().replace(shard="optimizer"), device=torch.device("cpu"))
    assert check_trainer_options(ok) == 1  # type: ignore[arg-type]


def test_grouped_layout_one_bucket_per_unit_last_first() -> None:
    from mpitrain.grad.zero.layout import plan_grouped_layout

    shapes = [(3, 2), (3,), (5, 3), (5,), (1,)]
    names = [f"p{i}" for i in range(5)]
    lay = plan_grouped_layout(names, shapes, 4, [[4], [0, 1], [2, 3]])
    assert [b.params for b in lay.buckets] == [(3, 2), (1, 0), (4,)]  # last unit first
    assert [b.numel for b in lay.buckets] == [20, 9, 1]
    assert [b.chunk for b in lay.buckets] == [5, 3, 1]
    assert [b.offset for b in lay.buckets] == [0, 20, 32]
    assert lay.total == 36 and lay.numel == 30
    for i, s in enumerate(lay.slots):
        (b,) = s.buckets
        span = lay.buckets[b]
        assert span.offset <= s.offset and s.offset + s.numel <= span.offset + span.numel, i
    with pytest.raises(ValueError, match="partition"):
        plan_grouped_layout(names, shapes, 4, [[0, 1], [2, 3]])


def test_default_units_look_inside_containers() -> None:
    from mpitrain.grad.zero.wrapper import default_units

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 2)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ReLU())
                                         for _ in range(2)])
            self.act = nn.ReLU()
            self.head = nn.Linear(2, 1)

    net = Net()
    units = default_units(net)
    assert units == [net.emb, net.blocks[0][0], net.blocks[1][0], net.head]
