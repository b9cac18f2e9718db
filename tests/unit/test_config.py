"""Config resolution: precedence, unknown keys, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpitrain.config import TrainConfig, resolve, valid_keys
from mpitrain.errors import ConfigError
from mpitrain.train.run import parse_config


def test_defaults() -> None:
    cfg = resolve({}, environ={})
    assert cfg == TrainConfig()


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("epochs = 3\nlr = 0.5\nbatch-size = 7\n")
    env = {"MPITRAIN_LR": "0.25", "MPITRAIN_EPOCHS": "4"}
    cfg = resolve({"config": str(f), "epochs": "5"}, environ=env)
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (5, 0.25, 7)


def test_train_table_in_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("[train]\nmodel = 'cnn'\nprogress = false\n")
    cfg = resolve({"config": str(f)}, environ={})
    assert cfg.model == "cnn" and cfg.progress is False


def test_unknown_file_key_names_key_and_lists_valid(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("epoch = 3\n")
    with pytest.raises(ConfigError) as info:
        resolve({"config": str(f)}, environ={})
    msg = str(info.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg and "batch_size" in msg


def test_unknown_env_key() -> None:
    with pytest.raises(ConfigError, match="MPITRAIN_EPOHCS"):
        resolve({}, environ={"MPITRAIN_EPOHCS": "3"})


def test_non_config_env_vars_ignored() -> None:
    cfg = resolve({}, environ={"MPITRAIN_CACHE": "/tmp/x", "MPITRAIN_REQUIRE_MPI": "1"})
    assert cfg == TrainConfig()


@pytest.mark.parametrize(
    ("cli", "needle"),
    [
        ({"epochs": "three"}, r"accepted: an integer in \[1, "),
        ({"epochs": "0"}, r"accepted: an integer in \[1, "),
        ({"lr": "-1"}, "'lr'"),
        ({"optimizer": "lbfgs"}, "choose one of"),
        ({"model": "gpt", "activation_checkpointing": "some"},
         "'activation_checkpointing'.*choose one of none, full, selective"),
        ({"resume": "auto"}, "--checkpoint-dir"),
    ],
)
def test_bad_values(cli: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve(cli, environ={})


def test_bool_from_env() -> None:
    assert resolve({}, environ={"MPITRAIN_PROGRESS": "off"}).progress is False
    with pytest.raises(ConfigError):
        resolve({}, environ={"MPITRAIN_PROGRESS": "maybe"})


def test_parse_flags() -> None:
    cfg = parse_config(["--epochs", "2", "--no-progress", "--batch-size", "8"])
    assert (cfg.epochs, cfg.progress, cfg.batch_size) == (2, False, 8)
    assert "epochs" in valid_keys()


def test_bad_choice_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--precision", "fp8"])
    assert info.value.code == 2


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve({"config": str(tmp_path / "nope.toml")}, environ={})


@pytest.mark.parametrize("mode", ["local-sgd", "param-server"])
def test_fp16_refused_with_modes_that_step_on_local_gradients(mode: str) -> None:
    from mpitrain.config import validate

    with pytest.raises(ConfigError, match=r"fp16 is not supported.*HINT.*bf16"):
        validate(TrainConfig(precision="fp16", exchange=mode))
    validate(TrainConfig(precision="fp16", exchange="double-buffer"))
