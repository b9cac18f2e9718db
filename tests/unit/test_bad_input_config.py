"""Bad config input, table-driven: every case is a one-line ConfigError (exit 2) that names the
key, the value and what is accepted, raised by ``resolve()`` before any data is opened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpitrain.config import TrainConfig, resolve, validate
from mpitrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# (option, value as given on the command line, accepted range as the message must state it)
FLAGS: list[tuple[str, str, str]] = [
    ("lr", "nan", "(0, 1000]"),
    ("lr", "inf", "(0, 1000]"),
    ("lr", "-inf", "(0, 1000]"),
    ("lr", "0", "(0, 1000]"),
    ("lr", "-0.1", "(0, 1000]"),
    ("lr", "1e400", "(0, 1000]"),
    ("lr", "5000", "(0, 1000]"),
    ("lr", "fast", "(0, 1000]"),
    ("momentum", "nan", "[0, 1)"),
    ("momentum", "1", "[0, 1)"),
    ("momentum", "-0.5", "[0, 1)"),
    ("weight_decay", "nan", "[0, 1]"),
    ("weight_decay", "-1e-4", "[0, 1]"),
    ("weight_decay", "2", "[0, 1]"),
    ("hang_timeout", "nan", "[1, 2592000]"),
    ("hang_timeout", "inf", "[1, 2592000]"),
    ("hang_timeout", "-5", "[1, 2592000]"),
    ("hang_timeout", "0.01", "[1, 2592000]"),
    ("hidden", "0", "[1, 1048576]"),
    ("hidden", "-8", "[1, 1048576]"),
    ("hidden", "1.5", "[1, 1048576]"),
    ("hidden", "1e400", "[1, 1048576]"),
    ("hidden", "99999999999", "[1, 1048576]"),
    ("step_every", "0", "[1, 1000000]"),
    ("step_every", "-1", "[1, 1000000]"),
    ("seed", "-1", "[0, 4294967295]"),
    ("seed", "4294967296", "[0, 4294967295]"),
    ("seed", "nan", "[0, 4294967295]"),
    ("bucket_mb", "-0.5", "(0, 4096]"),
    ("bucket_mb", "nan", "(0, 4096]"),
    ("bucket_mb", "inf", "(0, 4096]"),
    ("bucket_mb", "-4", "(0, 4096]"),
    ("warmup_epochs", "nan", "[0, 1000000]"),
    ("warmup_epochs", "-1", "[0, 1000000]"),
    ("warmup_epochs", "inf", "[0, 1000000]"),
    ("epochs", "0", "[1, 1000000]"),
    ("epochs", "-3", "[1, 1000000]"),
    ("epochs", "1e400", "[1, 1000000]"),
    ("epochs", "3.5", "[1, 1000000]"),
    ("max_steps", "-1", "[0, 1000000000000]"),
    ("batch_size", "0", "[1, 1048576]"),
    ("batch_size", "1e9", "[1, 1048576]"),
    ("accumulate", "0", "[1, 65536]"),
    ("keep_last", "0", "[1, 1000000]"),
    ("checkpoint_every", "-1", "[0, 1000000000000]"),
    ("checkpoint_minutes", "nan", "[0, 525600]"),
    ("checkpoint_minutes", "-1", "[0, 525600]"),
    ("checkpoint_minutes", "inf", "[0, 525600]"),
    ("servers", "0", "[1, 65536]"),
    ("max_staleness", "-1", "[0, 1000000]"),
    ("local_steps", "0", "[1, 1000000]"),
    ("straggler_ms", "nan", "[0, 3600000]"),
    ("straggler_ms", "-1", "[0, 3600000]"),
    ("clip_grad_norm", "nan", "[0, 1000000000]"),
    ("clip_grad_norm", "inf", "[0, 1000000000]"),
    ("clip_grad_norm", "-1", "[0, 1000000000]"),
    ("prefetch", "0", "[1, 1024]"),
    ("prefetch", "100000", "[1, 1024]"),
    ("eval_every", "-1", "[0, 1000000]"),
]

# signal lists that would never stop the run (cannot be caught) or stop it when nothing is wrong
SIGNALS: list[tuple[str, str, str]] = [
    ("KILL", "KILL", "cannot be caught"),
    ("SIGSTOP", "SIGSTOP", "cannot be caught"),
    ("USR1,KILL", "KILL", "cannot be caught"),
    ("CHLD", "CHLD", "in normal operation"),
    ("CONT", "CONT", "in normal operation"),
    ("WINCH", "WINCH", "in normal operation"),
    ("URG", "URG", "in normal operation"),
    ("PIPE", "PIPE", "in normal operation"),
    ("TSTP", "TSTP", "in normal operation"),
    ("TTIN", "TTIN", "in normal operation"),
    ("PROF", "PROF", "in normal operation"),
    ("SEGV", "SEGV", "crash"),
    ("FPE", "FPE", "crash"),
    ("term,ABRT", "ABRT", "crash"),
    ("NOPE", "NOPE", "unknown signal"),
    ("9", "9", "unknown signal"),
]

# (TOML text, key, value as the message shows it, accepted)
TOML: list[tuple[str, str, str, str]] = [
    ("lr = nan\n", "lr", "nan", "(0, 1000]"),
    ("lr = inf\n", "lr", "inf", "(0, 1000]"),
    ("lr = -inf\n", "lr", "-inf", "(0, 1000]"),
    ("lr = [0.1]\n", "lr", "[0.1]", "(0, 1000]"),
    ("epochs = true\n", "epochs", "True", "[1, 1000000]"),
    ("epochs = [1, 2]\n", "epochs", "[1, 2]", "[1, 1000000]"),
    ("epochs = 1e400\n", "epochs", "inf", "[1, 1000000]"),
    ("batch-size = 3.5\n", "batch_size", "3.5", "[1, 1048576]"),
    ("batch-size = { a = 1 }\n", "batch_size", "{'a': 1}", "[1, 1048576]"),
    ("seed = 99999999999999\n", "seed", "99999999999999", "[0, 4294967295]"),
    ("hang-timeout = nan\n", "hang_timeout", "nan", "[1, 2592000]"),
    ("momentum = false\n", "momentum", "False", "[0, 1)"),
    ("model = ['mlp']\n", "model", "['mlp']", "a string"),
    ("model = { name = 'mlp' }\n", "model", "{'name': 'mlp'}", "a string"),
    ("train-split = 5\n", "train_split", "5", "a string"),
    ("resume = true\n", "resume", "True", "a string"),
    ("data = 2024-01-01\n", "data", "datetime.date(2024, 1, 1)", "a string"),
    ("progress = 1\n", "progress", "1", "true/false"),
    ("progress = [true]\n", "progress", "[True]", "true/false"),
    ("preempt-signals = 'KILL'\n", "preempt_signals", "'KILL'", "cannot be caught"),
    ("preempt-signals = ['USR1']\n", "preempt_signals", "['USR1']", "a string"),
    ("[train]\nlr = nan\n", "lr", "nan", "(0, 1000]"),
]

# (MPITRAIN_* variable, value, option, accepted)
ENV: list[tuple[str, str, str, str]] = [
    ("MPITRAIN_LR", "1e400", "lr", "(0, 1000]"),
    ("MPITRAIN_LR", "nan", "lr", "(0, 1000]"),
    ("MPITRAIN_EPOCHS", "1e400", "epochs", "[1, 1000000]"),
    ("MPITRAIN_SEED", "-1", "seed", "[0, 4294967295]"),
    ("MPITRAIN_HIDDEN", "nan", "hidden", "[1, 1048576]"),
    ("MPITRAIN_MOMENTUM", "Infinity", "momentum", "[0, 1)"),
    ("MPITRAIN_BUCKET_MB", "-inf", "bucket_mb", "(0, 4096]"),
    ("MPITRAIN_PREEMPT_SIGNALS", "STOP,TERM", "preempt_signals", "cannot be caught"),
    ("MPITRAIN_PROGRESS", "maybe", "progress", "true/false"),
]


def _check(exc: ConfigError, key: str, value: str, accepted: str) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert f"'{key}'" in msg, msg
    assert value in msg, msg
    assert accepted in msg, msg
    assert "HINT" in msg, msg


@pytest.mark.parametrize(("key", "value", "accepted"), FLAGS)
def test_bad_flag(key: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({key: value}, environ={})
    _check(info.value, key, repr(value), accepted)
    assert f"--{key.replace('_', '-')}" in str(info.value)  # where the value came from


@pytest.mark.parametrize(("spec", "bad", "reason"), SIGNALS)
def test_bad_preempt_signals(spec: str, bad: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({"preempt_signals": spec}, environ={})
    _check(info.value, "preempt_signals", repr(bad), reason)
    assert "USR1" in str(info.value) and "TERM" in str(info.value)  # the accepted names


@pytest.mark.parametrize(("text", "key", "shown", "accepted"), TOML)
def test_bad_toml_value(tmp_path: Path, text: str, key: str, shown: str, accepted: str) -> None:
    f = tmp_path / "run.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve({"config": str(f)}, environ={})
    _check(info.value, key, shown, accepted)
    assert str(f) in str(info.value)


@pytest.mark.parametrize(("var", "value", "key", "accepted"), ENV)
def test_bad_env_value(var: str, value: str, key: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, environ={var: value})
    _check(info.value, key, repr(value), accepted)
    assert var in str(info.value)


def _config_file(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        d = tmp_path / "conf.d"
        d.mkdir()
        return d
    f = tmp_path / "run.toml"
    if kind == "non-utf8":
        f.write_bytes(b"model = '\xff\xfe'\n")
    elif kind == "invalid TOML":
        f.write_text("lr = = 3\n")
    elif kind == "duplicate key":
        f.write_text("batch-size = 8\nbatch_size = 16\n")
    elif kind == "not a table":
        f.write_text("train = 5\n")
    return f


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("directory", "is a directory"),
        ("non-utf8", "UTF-8"),
        ("invalid TOML", "not valid TOML"),
        ("duplicate key", "'batch_size' is given twice"),
        ("not a table", "unknown option 'train'"),
    ],
)
def test_bad_config_file(tmp_path: Path, kind: str, needle: str) -> None:
    path = _config_file(tmp_path, kind)
    for source in ({"config": str(path)}, {}):  # --config and MPITRAIN_CONFIG
        environ = {} if source else {"MPITRAIN_CONFIG": str(path)}
        with pytest.raises(ConfigError) as info:
            resolve(source, environ=environ)
        msg = str(info.value)
        assert "\n" not in msg and needle in msg and str(path) in msg and "HINT" in msg, msg


def test_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "run.toml"
    f.write_text("lr = 0.1\n")
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"cannot read config file .*Permission denied.*HINT"):
        resolve({"config": str(f)}, environ={})


def test_validate_checks_direct_construction_and_replace() -> None:
    """The same table guards configs built in code (``TrainConfig(...)``, ``.replace``)."""
    with pytest.raises(ConfigError, match=r"'lr' = nan .*\(0, 1000\]"):
        validate(TrainConfig(lr=float("nan")))
    with pytest.raises(ConfigError, match=r"'momentum'"):
        TrainConfig().replace(momentum=1.5)
    with pytest.raises(ConfigError, match=r"'epochs'"):
        validate(TrainConfig(epochs=True))


@pytest.mark.parametrize(
    ("cli", "needle"),
    [
        ({"nesterov": "true", "momentum": "0"}, "--nesterov needs --momentum > 0"),
        ({"compression": "gzip"}, "choose one of"),
        ({"checkpoint_every": "5"}, "no --checkpoint-dir is given: none would be written"),
        ({"checkpoint_minutes": "30"}, "no --checkpoint-dir is given: none would be written"),
        ({"checkpoint_dir": ""}, "option 'checkpoint_dir' from --checkpoint-dir is empty"),
        ({"data": " "}, "option 'data' from --data is empty"),
        ({"train_split": ""}, "option 'train_split' from --train-split is empty"),
        ({"model": "resnet"}, "accepted: mlp, cnn, gpt, llama, gpt2 or package.module:factory"),
        ({"config": ""}, "--config is empty"),
    ],
)
def test_bad_combinations(cli: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve(cli, environ={})


def test_good_edge_values_still_accepted(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("epochs = 2.0\nhang-timeout = 0\nmomentum = 0.0\nseed = 4294967295\n")
    cfg = resolve(
        {"config": str(f), "lr": "1e-3", "preempt_signals": "usr2, sigterm,HUP"},
        environ={"MPITRAIN_BUCKET_MB": "0.5", "MPITRAIN_PROGRESS": "off"},
    )
    assert (cfg.epochs, cfg.hang_timeout, cfg.seed, cfg.bucket_mb) == (2, 0.0, 4294967295, 0.5)
    assert resolve({"preempt_signals": ""}, environ={}).preempt_signals == ""


def _run_cli(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    child = {
        k: v for k, v in os.environ.items() if not k.startswith("MPITRAIN_")
    } | {"MPITRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "mpitrain", *args],
        cwd=ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--lr", "nan"], {}, "'lr'"),
        # a bad value is an error even where a flag overrides it
        (["--epochs", "2"], {"MPITRAIN_EPOCHS": "1e400"}, "'epochs'"),
        (["--config", "."], {}, "is a directory"),
    ],
)
def test_cli_exits_2_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    cache = tmp_path / "cache"  # the digits cache: not built, because no data is opened
    proc = _run_cli(args, cache, **env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpitrain: error: "), proc.stderr
    assert needle in lines[0], proc.stderr
    assert not cache.exists(), "the data was opened before the config was checked"
