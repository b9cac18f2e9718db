"""A command line that explains itself: sections in --help, every command's --help, --version,
``config --print`` and the optimizers' own default learning rates."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpitrain
from mpitrain.cli import COMMANDS, main
from mpitrain.config import SECTIONS, TrainConfig, option_fields, resolve
from mpitrain.config_args import build_parser
from mpitrain.config_sources import resolve_sources
from mpitrain.config_values import OPTIMIZER_DEFAULTS
from mpitrain.errors import ConfigError
from mpitrain.train.optim import base_lr, lr_note

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_mpitrain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("MPITRAIN_")]:
        monkeypatch.delenv(name)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        code = main(list(argv))
        raise SystemExit(code)
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out[:200]
    return out


def _sections(text: str) -> dict[str, str]:
    """``--help`` text by section title (``data`` for the ``data options:`` block)."""
    parts = re.split(r"^(\S[^\n]*) options:\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _entry(block: str, flag: str) -> str:
    """The help entry of ``flag`` in ``block``: its line and the indented lines below it."""
    m = re.search(rf"^  {re.escape(flag)}[ ,\n].*?(?=^  -|\Z)", block, flags=re.M | re.S)
    assert m is not None, flag
    return m.group(0)


def test_every_option_in_exactly_one_section_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "--help")
    sections = _sections(text)
    assert [s for s in sections if s in SECTIONS] == list(SECTIONS)  # in the user's order
    for name, f in option_fields().items():
        flag = "--" + name.replace("_", "-")
        where = [s for s, block in sections.items()
                 if re.search(rf"^  {re.escape(flag)}[ ,\n]", block, flags=re.M)]
        assert where == [f.metadata["section"]], (name, where)
    assert _help(capsys, "train", "--help") == text


def test_every_choice_option_lists_its_choices(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "--help")
    chosen = {n: f for n, f in option_fields().items() if f.metadata["choices"]}
    assert {"optimizer", "exchange", "shard", "precision"} <= set(chosen)
    for name, f in chosen.items():
        entry = _entry(text, "--" + name.replace("_", "-"))
        assert "{" + ",".join(f.metadata["choices"]) + "}" in entry, entry


def test_each_option_shows_its_variable_once(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "--help")
    for name in option_fields():
        var = f"MPITRAIN_{name.upper()}"
        assert len(re.findall(rf"\b{var}\b", text)) == 1, var
        assert var in _entry(text, "--" + name.replace("_", "-"))
    assert "default: sgd 0.05, adam 0.006, adamw 0.006;" in " ".join(_entry(text, "--lr").split())


def test_top_help_lists_every_command_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "--help")
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.summary)}$", text, re.M), name


@pytest.mark.parametrize("command", [c for c, spec in COMMANDS.items() if not spec.needs_mpi])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    usage = _help(capsys, command, "--help").splitlines()[0]
    assert re.match(rf"usage: python -m mpitrain[ .]{command}\b", usage), usage


def test_mpi_commands_have_help_without_a_job() -> None:
    # doctor runs under MPI (its --help goes through the abort-on-exception entry helper)
    out = subprocess.run([sys.executable, "-m", "mpitrain", "doctor", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: python -m mpitrain doctor")
    assert {c for c, spec in COMMANDS.items() if spec.needs_mpi} == {"train", "doctor"}


def test_version_has_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version"], ["train", "--version"], ["--epochs", "3", "--version"]):
        assert main(argv) == 0  # no MPI job, no torch
        assert capsys.readouterr().out == f"mpitrain {mpitrain.__version__}\n"
    with pytest.raises(SystemExit):
        build_parser("p", "d").parse_args(["--version"])
    assert capsys.readouterr().out == f"mpitrain {mpitrain.__version__}\n"
    assert importlib.metadata.version("mpitrain") == mpitrain.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split(
        "[tool.setuptools.dynamic]")[0]


# ---- config --print -------------------------------------------------------------------------
FLAGS = ["--optimizer", "adam", "--epochs", "3", "--no-progress", "--bucket-mb", "auto",
         "--checkpoint-dir", "ck", "--resume", "auto", "--test-split", "",
         "--run-dir", 'runs/"q" \\ ü\x7f', "--timeline", "t.json", "--timeline-steps", "2:5",
         "--accumulate", "2"]


def _print(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["config", "--print", *argv]) == 0
    return capsys.readouterr().out


def test_config_print_round_trips_through_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.toml"
    base.write_text("seed = 7\nhidden = 64\n")
    monkeypatch.setenv("MPITRAIN_WARMUP_EPOCHS", "0.5")
    monkeypatch.setenv("MPITRAIN_HIDDEN", "96")
    text = _print(capsys, *FLAGS, "--config", str(base))
    expected = resolve(vars(build_parser("p", "d").parse_args([*FLAGS, "--config", str(base)])))
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    for name in [n for n in __import__("os").environ if n.startswith("MPITRAIN_")]:
        monkeypatch.delenv(name)
    back = resolve({"config": str(printed)})
    assert back == expected  # every value, and the same options counted as the user's
    assert dataclasses.asdict(back)["explicit"] == expected.explicit
    assert (back.run_dir, back.bucket_mb, back.hidden, back.seed) == (
        'runs/"q" \\ ü\x7f', 0.0, 96, 7)
    # each value says where it came from; defaults are commented out
    lines = text.splitlines()
    assert 'optimizer = "adam"  # from --optimizer' in lines
    assert "progress = false  # from --no-progress" in lines
    assert "warmup_epochs = 0.5  # from MPITRAIN_WARMUP_EPOCHS" in lines
    assert "hidden = 96  # from MPITRAIN_HIDDEN" in lines  # the environment wins over the file
    assert f"seed = 7  # from config file '{base}'" in lines
    assert "# lr = 0.006  # default for --optimizer adam" in lines
    assert "# momentum = 0.9  # default" in lines
    assert "# data =  # unset (default)" in lines
    # one section heading per --help section, in the same order
    assert [ln[6:-4] for ln in lines if ln.startswith("# --- ")] == list(SECTIONS)


def test_config_print_of_the_defaults_reads_back_as_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = tmp_path / "p.toml"
    printed.write_text(_print(capsys))
    assert resolve({"config": str(printed)}) == resolve({}) == TrainConfig()


def test_config_without_print_or_with_a_bad_value_is_one_line(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config"]) == 2
    assert main(["config", "--print", "--epochs", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("HINT" in ln for ln in err), err


# ---- each optimizer's own lr and scaling rule -----------------------------------------------
def test_each_optimizer_has_its_own_default_lr() -> None:
    assert resolve({}).lr == 0.05
    assert resolve({"optimizer": "adam"}).lr == OPTIMIZER_DEFAULTS["adam"].lr == 0.006
    assert resolve({}, {"MPITRAIN_OPTIMIZER": "adamw"}).lr == 0.006
    assert resolve({"optimizer": "adam", "lr": "0.1"}).lr == 0.1  # a given lr is kept
    cfg, sources = resolve_sources({"optimizer": "adam"})
    assert "lr" not in cfg.explicit.split(",") and sources["lr"] == "default for --optimizer adam"


def test_scaling_rule_follows_the_optimizer() -> None:
    sgd, adam = resolve({}), resolve({"optimizer": "adam"})
    assert base_lr(sgd, 4) == pytest.approx(0.2)  # linear: 0.05 x 4
    assert base_lr(adam, 4) == pytest.approx(0.012)  # square root: 0.006 x 2
    assert base_lr(adam.replace(global_batch=96), 2) == pytest.approx(0.006 * 3**0.5)
    assert base_lr(adam.replace(scale_lr=False), 4) == 0.006


def test_the_chosen_default_is_announced() -> None:
    note = lr_note(resolve({"optimizer": "adam"}), 4)
    assert note == ("mpitrain: --optimizer adam defaults: --lr 0.006 for 32 samples, sqrt "
                    "scaling to 0.012 at global batch 128 (set --lr to override)")
    assert lr_note(resolve({"optimizer": "adam", "lr": "0.006"}), 4) is None  # the user's
    assert lr_note(resolve({}), 4) is None  # SGD's is the plain default
    gpt = resolve({"model": "gpt", "optimizer": "adamw"}).replace(lr=3e-3)  # --model gpt's own
    assert lr_note(gpt, 1) is None


def test_unknown_optimizer_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="choose one of sgd, adam, adamw"):
        resolve({"optimizer": "lamb"})
