"""Serial tests of buckets, hooks and the engine's ordering logic (fake 2-rank reducer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpitrain.comm.handle import DONE, Handle
from mpitrain.errors import ConfigError
from mpitrain.grad.buckets import build_buckets
from mpitrain.grad.engine import GradEngine
from mpitrain.grad.hooks import HOOKS, HookState, allreduce_hook, make_hook


class FakeReducer:
    """Pretends to be 2 ranks holding identical gradients; records when buckets start."""

    size = 2

    def __init__(self) -> None:
        self.engine: GradEngine | None = None
        self.log: list[tuple[int, int]] = []  # (data_ptr, grads seen so far)

    def iallreduce_(self, t: torch.Tensor, *, average: bool) -> Handle:
        seen = sum(self.engine._counts) if self.engine else -1
        self.log.append((t.data_ptr(), seen))
        if not average:
            t.mul_(2)
        return DONE

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        self.iallreduce_(t, average=average)


def engine_for(model: nn.Module, bucket_mb: float, **kw: object) -> tuple[GradEngine, FakeReducer]:
    red = FakeReducer()
    eng = GradEngine(
        list(model.named_parameters()),
        hook=allreduce_hook,
        state=HookState(red),
        bucket_mb=bucket_mb,
        **kw,  # type: ignore[arg-type]
    )
    red.engine = eng
    return eng, red


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def test_buckets_reverse_order_one_dtype_each_and_cap() -> None:
    params = [
        torch.zeros(100),
        torch.zeros(10, dtype=torch.float64),
        torch.zeros(300),
        torch.zeros(50),
    ]
    plan = build_buckets(["a", "b", "c", "d"], params, bucket_bytes=1024)
    assert [b.names for b in plan.buckets] == [["d"], ["c"], ["b"], ["a"]]
    assert [b.dtype for b in plan.buckets] == [torch.float32] * 2 + [torch.float64, torch.float32]
    assert sorted(str(k[0]) for k in plan.buffers) == ["torch.float32", "torch.float64"]
    f32 = plan.buffers[(torch.float32, torch.device("cpu"))]
    assert f32.numel() == 450
    lo, hi = f32.data_ptr(), f32.data_ptr() + 450 * 4
    for i in (0, 2, 3):
        assert lo <= plan.views[i].data_ptr() < hi and plan.views[i].shape == params[i].shape
    plan = build_buckets(["a", "c", "d"], [params[0], params[2], params[3]], bucket_bytes=1500)
    assert [b.names for b in plan.buckets] == [["d", "c"], ["a"]]


def test_grads_alias_buckets_and_start_during_backward_in_order() -> None:
    model = mlp()
    eng, red = engine_for(model, bucket_mb=16 * 17 * 4 / 2**20)  # ~one layer per bucket
    assert len(eng.buckets) >= 3
    ref = mlp()
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    # buckets started in index order, the first before the last gradient was ready
    ptrs = [b.buffer.data_ptr() for b in eng.buckets]
    assert [p for p, _ in red.log] == ptrs
    assert red.log[0][1] < len(eng.params)
    eng.synchronize()
    for p, q, v in zip(model.parameters(), ref.parameters(), eng.plan.views, strict=True):
        assert p.grad is v
        torch.testing.assert_close(p.grad, q.grad)


def test_unused_parameter_bucket_starts_at_synchronize_with_zeros() -> None:
    model = mlp()
    model.add_module("unused", nn.Linear(3, 3))  # registered last -> first bucket
    eng, red = engine_for(model, bucket_mb=1e-4)
    model[:5](torch.randn(2, 8)).sum().backward()
    assert red.log == []  # bucket 0 (unused) blocks the ones behind it: same order everywhere
    eng.synchronize()
    assert len(red.log) == len(eng.buckets)
    assert torch.count_nonzero(model.unused.weight.grad) == 0


def test_backward_passes_per_step_reduces_once_after_k_passes() -> None:
    model = mlp()
    eng, red = engine_for(model, bucket_mb=64, passes_per_step=2)
    model(torch.randn(2, 8)).sum().backward()
    assert red.log == []
    model(torch.randn(2, 8)).sum().backward()
    assert len(red.log) == 1
    eng.synchronize()
    assert len(red.log) == 1


def test_extra_backward_before_synchronize_raises() -> None:
    from mpitrain.errors import CommError

    model = mlp()
    eng, _ = engine_for(model, bucket_mb=64)
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(CommError, match=r"computed 2 times before synchronize\(\).*no_sync"):
        model(torch.randn(2, 8)).sum().backward()
    eng.reset()


def test_disabled_engine_accumulates_locally() -> None:
    model = mlp()
    eng, red = engine_for(model, bucket_mb=64)
    eng.enabled = False
    model(torch.randn(2, 8)).sum().backward()
    assert red.log == []
    eng.enabled = True
    model(torch.randn(2, 8)).sum().backward()
    assert len(red.log) == 1


def test_grads_set_to_none_are_reattached() -> None:
    model = mlp()
    eng, _ = engine_for(model, bucket_mb=64)
    for p in model.parameters():
        p.grad = None
    model(torch.randn(2, 8)).sum().backward()  # autograd makes new grads; hooks copy them in
    eng.synchronize()
    assert all(p.grad is v for p, v in zip(model.parameters(), eng.plan.views, strict=True))
    for p in model.parameters():
        p.grad = None
    eng.attach_grads()
    assert all(torch.count_nonzero(v) == 0 for v in eng.plan.views)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp16-ef", "bf16-ef"])
def test_compression_hooks_round_and_keep_residual(name: str) -> None:
    model = mlp()
    red = FakeReducer()
    state = HookState(red)
    eng = GradEngine(list(model.named_parameters()), hook=make_hook(name), state=state,
                     bucket_mb=64, overlap=False)
    model(torch.randn(2, 8)).sum().backward()
    exact = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()][::-1])
    eng.synchronize()
    got = eng.buckets[0].buffer
    half = torch.float16 if name.startswith("fp16") else torch.bfloat16
    # fake reducer: average of 2 identical ranks = pre-divided, rounded, summed in half
    want = ((exact / 2).to(half) * 2).float()
    torch.testing.assert_close(got, want)
    if name.endswith("-ef"):
        torch.testing.assert_close(state.residual[0], exact / 2 - (exact / 2).to(half).float())
    else:
        assert state.residual == {}


def test_make_hook_registry() -> None:
    assert set(HOOKS) == {"none", "fp16", "bf16", "fp16-ef", "bf16-ef"}
    assert make_hook(None) is allreduce_hook and make_hook("none") is allreduce_hook
    with pytest.raises(ConfigError, match=r"unknown compression 'int8'.*HINT"):
        make_hook("int8")


def test_distributed_optimizer_is_an_optimizer_for_schedulers() -> None:
    from mpi4py import MPI

    from mpitrain.grad.optimizer import DistributedOptimizer

    model = mlp()
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        comm=MPI.COMM_SELF,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
