"""The exchange protocol and registry (issue 13): every mode implements it, options are
configuration (flag, TOML, MPITRAIN_*), other modes' options are refused, tuned defaults
apply only where the user set nothing, and eval() sends nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from mpi4py import MPI

from mpitrain.config import TrainConfig, resolve
from mpitrain.errors import ConfigError
from mpitrain.grad.protocol import (
    MODES,
    Exchange,
    agreement_lag,
    get_mode,
    mode_options,
    tuned_changes,
)
from mpitrain.runtime import env


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_registry_matches_exchange_choices() -> None:
    choices = dataclasses.fields(TrainConfig)
    exchange = next(f for f in choices if f.name == "exchange")
    assert tuple(MODES) == tuple(exchange.metadata["choices"])
    for name in MODES:
        spec = get_mode(name)
        assert spec.name == name
        for f in spec.fields:
            assert hasattr(TrainConfig(), f), f
    with pytest.raises(ConfigError, match="unknown"):
        get_mode("gossip")


def test_wrappers_implement_the_protocol() -> None:
    from mpitrain.grad import DataParallel
    from mpitrain.grad.modes.double_buffer import DoubleBuffer
    from mpitrain.grad.modes.local_sgd import LocalSGD

    for w in (
        DataParallel(_model(), comm=MPI.COMM_SELF),
        DoubleBuffer(_model(), MPI.COMM_SELF),
        LocalSGD(_model(), MPI.COMM_SELF, local_steps=2),
    ):
        assert isinstance(w, Exchange), type(w)
        w.close()


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("double_buffer_progress", "thread", "thread"),
        ("delay_compensation", "0.5", 0.5),
        ("sync_warmup_steps", "7", 7),
        ("local_sgd_average_optimizer", "1", True),
    ],
)
def test_mode_option_from_flag_file_and_env(
    tmp_path: Path, key: str, raw: str, value: Any
) -> None:
    mode = "double-buffer" if key in ("double_buffer_progress", "delay_compensation") else (
        "local-sgd"
    )
    flag = resolve({"exchange": mode, key: raw}, environ={})
    f = tmp_path / "run.toml"
    f.write_text(f"exchange = '{mode}'\n{key.replace('_', '-')} = '{raw}'\n")
    file = resolve({"config": str(f)}, environ={})
    environ = {"MPITRAIN_EXCHANGE": mode, f"MPITRAIN_{key.upper()}": raw}
    var = resolve({}, environ=environ)
    for cfg in (flag, file, var):
        assert getattr(mode_options(cfg), key) == value


def test_old_env_only_keys_are_gone() -> None:
    for key in ("local_sgd_warmup", "double_buffer_progress", "delay_compensation"):
        assert key not in env.TABLE
    # MPITRAIN_LOCAL_SGD_WARMUP (the old name) is now an unknown option (--sync-warmup-steps)
    with pytest.raises(ConfigError, match=r"unknown option .MPITRAIN_LOCAL_SGD_WARMUP"):
        resolve({}, environ={"MPITRAIN_LOCAL_SGD_WARMUP": "3"})


@pytest.mark.parametrize(
    ("cli", "match"),
    [
        ({"double_buffer_progress": "sometimes"}, "double_buffer_progress"),
        ({"delay_compensation": "-1"}, "delay_compensation"),
        ({"sync_warmup_steps": "-2"}, "sync_warmup_steps"),
    ],
)
def test_invalid_mode_option_refused(cli: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(cli, environ={})


@pytest.mark.parametrize(
    ("mode", "cli", "owner"),
    [
        ("sync", {"max_staleness": "2"}, "param-server"),
        ("double-buffer", {"local_steps": "8"}, "local-sgd"),
        ("local-sgd", {"delay_compensation": "0.1"}, "double-buffer"),
        ("param-server", {"double_buffer_progress": "thread"}, "double-buffer"),
    ],
)
def test_option_of_another_mode_refused(mode: str, cli: dict[str, str], owner: str) -> None:
    cfg = resolve({"exchange": mode, **cli}, environ={})
    with pytest.raises(ConfigError, match=f"belongs to --exchange {owner}"):
        mode_options(cfg)


def test_param_server_refuses_compression() -> None:
    cfg = resolve({"exchange": "param-server", "compression": "fp16"}, environ={})
    with pytest.raises(ConfigError, match="HINT"):
        mode_options(cfg)


def test_tuned_defaults_only_where_unset_and_switchable() -> None:
    db = resolve({"exchange": "double-buffer"}, environ={})
    changes = tuned_changes(db, 2)
    assert changes["lr"] == 0.1 and "batch_size" not in changes and not changes["scale_lr"]
    assert tuned_changes(db, 4)["batch_size"] == 16
    mine = resolve({"exchange": "double-buffer", "momentum": "0.5"}, environ={})
    kept = tuned_changes(mine, 2)  # the momentum group is the user's; the lr group is tuned
    assert "nesterov" not in kept and "momentum" not in kept and kept["lr"] == 0.1
    lr_only = tuned_changes(resolve({"exchange": "double-buffer", "lr": "0.3"}, environ={}), 4)
    assert lr_only == {"nesterov": True}
    adam = resolve({"exchange": "double-buffer", "optimizer": "adam"}, environ={})
    assert tuned_changes(adam, 2) == {}
    off = resolve({"exchange": "double-buffer", "mode_defaults": "false"}, environ={})
    assert tuned_changes(off, 2) == {}
    assert tuned_changes(resolve({}, environ={}), 2) == {}  # sync is left alone


def test_agreement_lag_from_registry() -> None:
    assert agreement_lag(TrainConfig()) == 0
    assert agreement_lag(TrainConfig(exchange="double-buffer")) == 1
    assert agreement_lag(TrainConfig(exchange="local-sgd", local_steps=5)) == 4
    assert agreement_lag(TrainConfig(exchange="param-server", max_staleness=3)) == 3


class _CountingComm:
    """A stand-in for the worker's link communicator that counts every call."""

    rank = 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return False  # Iprobe: nothing waiting

        return call


def test_eval_sends_nothing_param_server_worker() -> None:
    from mpitrain.grad.modes.param_server import ServerLink
    from mpitrain.grad.modes.param_server_worker import ParamServerWorker

    link_comm = _CountingComm()
    link = ServerLink(link_comm, [1], 1)  # type: ignore[arg-type]
    w = ParamServerWorker(_model(), MPI.COMM_SELF, link, max_staleness=0)
    link_comm.calls.clear()
    w.eval()
    w.train()
    w.train(False)
    assert link_comm.calls == []  # before issue 13, train(False) drained: Iprobe/Recv
    w.drain()  # the explicit, collective way
    assert link_comm.calls == ["Iprobe"]


def test_eval_sends_nothing_double_buffer() -> None:
    from mpitrain.grad.modes.double_buffer import DoubleBuffer

    w = DoubleBuffer(_model(), MPI.COMM_SELF)
    started: list[int] = []
    inner = w.transport.iallreduce_

    def counting(buf: torch.Tensor, key: int = 0) -> Any:
        started.append(key)
        return inner(buf, key)

    w.transport.iallreduce_ = counting  # type: ignore[method-assign]
    w.eval()
    w.train()
    assert started == []
    torch.nn.functional.cross_entropy(w(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    w.synchronize()
    assert started == [0]
    w.close()


@pytest.mark.parametrize("mode", ["sync", "double-buffer", "local-sgd"])
def test_modes_use_the_runs_transport_and_compression(mode: str) -> None:
    from mpitrain.comm.reducer import FlatReducer
    from mpitrain.grad.hooks import fp16_hook
    from mpitrain.grad.protocol import BuildContext, build_exchange
    from mpitrain.runtime.world import World

    made: list[tuple[FlatReducer, bool | None]] = []

    def make_reducer(overlap: bool | None) -> FlatReducer:
        made.append((FlatReducer(MPI.COMM_SELF.Dup(), overlap=overlap), overlap))
        return made[-1][0]

    cfg = resolve({"exchange": mode, "compression": "fp16"}, environ={})
    ctx = BuildContext(cfg, World.create(MPI.COMM_SELF), _model(), torch.device("cpu"),
                       make_reducer=make_reducer)
    model = build_exchange(ctx)
    assert len(made) == 1
    if mode == "sync":
        assert model.reducer is made[0][0] and model.engine.hook is fp16_hook  # type: ignore[attr-defined]
    else:
        assert model.transport.reducer is made[0][0]  # type: ignore[attr-defined]
        assert model.transport.hook is fp16_hook  # type: ignore[attr-defined]
        assert made[0][1] is (mode == "double-buffer")  # double-buffer needs non-blocking
    model.close()
