"""Bad input to the Slurm renderer: every case is refused with one line naming the thing + a HINT.

Each row gives the template, the renderer options, an optional grid file (name, content) and
the words the message must contain. A few rows also run ``python -m mpitrain slurm render`` in
a subprocess: exit status 2, the message on stderr, and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mpitrain.errors import ConfigError
from mpitrain.slurm.render import RenderOptions, render

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "slurm" / "lightning_job.py"  # an existing script for --script


@dataclass(frozen=True)
class Case:
    """One bad input: what is rendered and what the error must say."""

    template: str
    opts: dict[str, Any]
    needles: tuple[str, ...]
    grid: tuple[str, bytes] | None = None  # (file name, content) written to tmp_path
    cli: list[str] | None = field(default=None)  # also run through the CLI with these words


GRID = ("g.toml", b"[grid]\nlr = [0.1]\n")  # a good grid, for sweep cases about other values


def grid_case(name: str, content: str | bytes, *needles: str, **opts: Any) -> Case:
    data = content.encode() if isinstance(content, str) else content
    return Case("sweep", opts, (name, *needles), grid=(name, data))


def combos(keys: int, values: int) -> str:
    return "[grid]\n" + "".join(f"k{i} = {list(range(values))}\n" for i in range(keys))


# fmt: off
CASES: dict[str, Case] = {
    # ---- 1. control characters in any value (a trailing newline passed the `$` anchors) ----
    "job-name-trailing-newline": Case("train-cpu", {"job_name": "demo\n"}, ("--job-name", "demo")),
    "partition-trailing-newline": Case("train-cpu", {"partition": "gpu\n"}, ("--partition",)),
    "account-trailing-newline": Case("train-cpu", {"account": "proj\n"}, ("--account",)),
    "time-trailing-newline": Case("train-cpu", {"time": "01:00:00\n"}, ("--time",)),
    "time-minutes-trailing-newline": Case("train-cpu", {"time": "30\n"}, ("--time",)),
    "time-non-ascii-digits": Case("train-cpu", {"time": "\u0663\u0660"}, ("--time",)),
    "log-trailing-newline": Case("train-cpu", {"log": "x.out\n"}, ("--log",)),
    "python-c1-control": Case("train-cpu", {"python": "py\x85thon"}, ("--python", "control")),
    "python-leading-dash": Case("train-cpu", {"python": "--uid=0"}, ("--python", "-")),
    "checkpoint-dir-line-separator": Case(
        "train-cpu", {"checkpoint_dir": "ck\u2028pt"}, ("--checkpoint-dir", "control")),
    "checkpoint-dir-leading-dash": Case(
        "train-cpu", {"checkpoint_dir": "-ck"}, ("--checkpoint-dir", "'-ck'")),
    "sweep-dir-bidi-override": Case(
        "sweep", {"sweep_dir": "sw\u202eeep"}, ("--sweep-dir", "U+202E"), grid=GRID),
    "env-setup-carriage-return": Case(
        "train-cpu", {"env_setup": "module load x\r\n"}, ("--env-setup", "control")),
    "env-setup-escape": Case("train-cpu", {"env_setup": "echo \x1b[2J"}, ("--env-setup",)),
    "train-arg-c1-control": Case("train-cpu", {"train_args": ["--data", "d\x85"]}, ("--data",)),
    "train-arg-not-utf8": Case(
        "train-cpu", {"train_args": ["--data", "d\udcff"]}, ("--data", "UTF-8")),
    "preprocess-arg-not-utf8": Case(
        "preprocess", {"train_args": ["--out", "o\udcff"]}, ("--out", "UTF-8")),
    "grid-value-c1-control": grid_case("g.toml", "[grid]\ndata = ['d\x85']\n", "data", "control"),
    "grid-key-trailing-newline": grid_case("g.toml", '[grid]\n"lr\\n" = [0.1]\n', "lr"),
    # ---- 2. training arguments as argparse parses them ----
    "abbrev-resume": Case("train-cpu", {"train_args": ["--re", "auto"]}, ("'--re'", "--resume")),
    "abbrev-resume-equals": Case(
        "train-cpu", {"train_args": ["--res=/x/step-1.pt"]}, ("'--res'", "--resume")),
    "abbrev-checkpoint-dir": Case(
        "train-gpu", {"train_args": ["--checkpoint-d", "/x"]}, ("--checkpoint-dir",)),
    "abbrev-summary-json-sweep": Case(
        "sweep", {"train_args": ["--su", "s.json"]}, ("'--su'", "--summary-json"), grid=GRID),
    "double-dash-in-train-args": Case(
        "train-cpu", {"train_args": ["--epochs", "1", "--"]}, ("'--'",)),
    "dangling-option": Case("train-cpu", {"train_args": ["--epochs"]}, ("--epochs",)),
    "unknown-option": Case("train-cpu", {"train_args": ["--lrr", "0.1"]}, ("--lrr",)),
    "bad-choice": Case("train-cpu", {"train_args": ["--optimizer", "lbfgs"]}, ("lbfgs",)),
    "bad-int-value": Case("train-cpu", {"train_args": ["--epochs", "ten"]}, ("epochs", "ten")),
    "help-in-train-args": Case("train-cpu", {"train_args": ["--help"]}, ("--help",)),
    "value-looks-like-option": Case(
        "train-cpu", {"train_args": ["--run-dir", "--resume"]}, ("--run-dir",)),
    "grid-key-abbreviates-resume": grid_case("g.toml", "[grid]\nre = ['auto']\n", "'re'"),
    "grid-key-unknown-lists-known": grid_case(
        "g.toml", "[grid]\nlrr = [0.1]\n", "'lrr'", "batch_size"),
    "grid-key-reserved": grid_case("g.toml", "[grid]\ncheckpoint_dir = ['x']\n", "checkpoint"),
    "grid-key-twice": grid_case(
        "g.toml", "[grid]\nbatch_size = [1]\nbatch-size = [2]\n", "batch-size", "batch_size"),
    "grid-bool-for-non-bool-option": grid_case("g.toml", "[grid]\nlr = [true]\n", "'lr'"),
    "grid-value-not-an-int": grid_case("g.toml", "[grid]\nepochs = ['ten']\n", "epochs", "ten"),
    "grid-value-not-finite": grid_case("g.toml", "[grid]\nlr = [nan]\n", "lr", "nan"),
    "csv-key-unknown": grid_case("g.csv", "lr,colour\n0.1,red\n", "'colour'"),
    # ---- 3. malformed grids ----
    "grid-is-a-number": grid_case("g.toml", "grid = 5\n", "[grid]"),
    "grid-is-a-list": grid_case("g.toml", "grid = [1, 2]\n", "[grid]"),
    "grid-is-array-of-tables": grid_case("g.toml", "[[grid]]\nlr = [1]\n", "[grid]"),
    "runs-is-a-number": grid_case("g.toml", "run = 5\n", "run"),
    "runs-are-not-tables": grid_case("g.toml", "run = [1, 2]\n", "run"),
    "run-is-a-single-table": grid_case("g.toml", "[run]\nlr = 0.1\n", "[[run]]"),
    "grid-value-list-of-lists": grid_case("g.toml", "[grid]\nlr = [[0.1, 0.2]]\n", "'lr'"),
    "grid-nested-table": grid_case("g.toml", "[grid.sub]\nlr = 1\n", "sub"),
    "grid-value-empty-list": grid_case("g.toml", "[grid]\nlr = []\n", "'lr'", "empty"),
    "grid-empty": grid_case("g.toml", "[grid]\n", "no runs"),
    "toml-not-utf8": grid_case("g.toml", b"[grid]\nlr = ['\xff']\n", "UTF-8"),
    "toml-syntax": grid_case("g.toml", "[grid\n", "TOML"),
    "csv-binary": grid_case("g.csv", b"\xff\xfe\x00\x01lr\n\x00\x00\n", "UTF-8"),
    "csv-nul": grid_case("g.csv", "lr\n0.1\x00\n", "NUL"),
    "csv-ragged-short": grid_case("g.csv", "lr,seed\n0.1,1\n0.2\n", "row 3", "columns"),
    "csv-ragged-long": grid_case("g.csv", "lr,seed\n0.1,1,9\n", "row 2", "columns"),
    "csv-duplicate-header": grid_case("g.csv", "lr,lr\n0.1,0.2\n", "'lr'"),
    "csv-header-only": grid_case("g.csv", "lr,seed\n", "no runs"),
    "grid-unknown-suffix": grid_case("g.json", '{"lr": [1]}', ".toml"),
    "too-many-for-array-limit": grid_case("g.toml", combos(2, 33), "1089", "--max-array-size"),
    "too-many-explicit-limit": grid_case(
        "g.toml", combos(1, 5), "5", "--max-array-size", max_array_size=4),
    "combinations-not-materialised": grid_case("g.toml", combos(10, 20), "--max-array-size"),
    # ---- more of the same kind ----
    "options-not-ints": Case("train-cpu", {"nodes": "2"}, ("--nodes",)),
    "options-not-strings": Case("train-cpu", {"job_name": 5}, ("--job-name", "string")),
    "optional-options-not-strings": Case("train-cpu", {"checkpoint_dir": 5}, ("--checkpoint-dir",)),
    "train-args-not-strings": Case("train-cpu", {"train_args": [3]}, ("3",)),
    "max-array-size-range": Case(
        "sweep", {"max_array_size": 0}, ("--max-array-size",), grid=GRID),
    # ---- --script (a user's own script instead of python -m mpitrain) ----
    "script-missing": Case(
        "train-cpu", {"script": "no-such-train.py"}, ("--script", "no-such-train.py", "exist")),
    "script-directory-without-main": Case(
        "train-gpu", {"script": str(ROOT / "tests")}, ("--script", "__main__.py")),
    "script-leading-dash": Case("train-cpu", {"script": "-c"}, ("--script", "'-c'", "./-c")),
    "script-empty": Case("train-cpu", {"script": ""}, ("--script",)),
    "script-c1-control": Case("train-cpu", {"script": "tr\x85ain.py"}, ("--script", "control")),
    "script-with-sweep": Case(
        "sweep", {"script": str(SCRIPT)}, ("--script", "sweep.sbatch", "train-cpu"), grid=GRID),
    "script-with-preprocess": Case(
        "preprocess", {"script": str(SCRIPT)}, ("--script", "preprocess.sbatch")),
    "script-with-grid": Case("train-cpu", {"script": str(SCRIPT)}, ("--grid",), grid=GRID),
    # ---- --on-rank-loss shrink: train templates, Open MPI's mpirun inside the allocation ----
    "shrink-with-srun": Case("train-cpu", {"on_rank_loss": "shrink", "launcher": "srun"},
                             ("--on-rank-loss shrink", "--launcher srun", "drop --launcher")),
    "shrink-with-script": Case("train-gpu", {"on_rank_loss": "shrink", "script": str(SCRIPT)},
                               ("--on-rank-loss shrink", "--script", "python -m mpitrain")),
    "shrink-with-sweep": Case("sweep", {"on_rank_loss": "shrink"},
                              ("--on-rank-loss shrink", "'sweep.sbatch'", "train-cpu"), grid=GRID),
    "shrink-with-preprocess": Case("preprocess", {"on_rank_loss": "shrink"},
                                   ("--on-rank-loss shrink", "'preprocess.sbatch'")),
    "on-rank-loss-unknown": Case("train-cpu", {"on_rank_loss": "survive"},
                                 ("--on-rank-loss", "'survive'", "abort, shrink")),
    "on-rank-loss-in-train-args": Case("train-cpu", {"train_args": ["--on-rank-loss", "shrink"]},
                                       ("'--on-rank-loss'", "renderer's --on-rank-loss")),
    "on-rank-loss-abbreviated": Case(
        "train-cpu", {"on_rank_loss": "shrink", "train_args": ["--on-rank=abort"]},
        ("'--on-rank'", "--on-rank-loss", "set by the template")),
    "min-ranks-without-shrink": Case("train-gpu", {"train_args": ["--min-ranks", "2"]},
                                     ("--min-ranks", "render with --on-rank-loss shrink")),
    "grid-key-on-rank-loss": grid_case("g.toml", "[grid]\non_rank_loss = ['shrink']\n",
                                       "on-rank-loss", "set by the sweep template"),
}
# fmt: on


def build(case: Case, tmp_path: Path) -> RenderOptions:
    opts = dict(case.opts)
    if case.grid is not None:
        name, data = case.grid
        (tmp_path / name).write_bytes(data)
        opts["grid"] = tmp_path / name
    return RenderOptions(**opts)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_one_line_and_hint(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    with pytest.raises(ConfigError) as info:
        render(case.template, build(case, tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert "HINT: " in msg, msg
    for needle in case.needles:
        assert needle in msg, (needle, msg)


def run_cli(words: list[str | bytes], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mpitrain", "slurm", "render", *words],
        cwd=cwd, env=env, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("words", "grid", "needle"),
    [
        (["train-cpu", "--", "--re", "auto"], None, b"--resume"),
        (["train-cpu", "--", "--data", b"d\xff"], None, b"UTF-8"),
        (["sweep", "--grid", "g.toml"], b"grid = 5\n", b"[grid]"),
        (["sweep", "--grid", "g.csv"], b"\xff\xfe\x00\x01lr\n", b"UTF-8"),
        (["train-cpu", "--script", "train.py", "--", "--lr", "1"], None, b"'train.py'"),
        (["train-cpu", "--on-rank-loss", "shrink", "--launcher", "srun"], None, b"srun"),
    ],
    ids=["abbreviated-resume", "non-utf8-argument", "grid-is-a-number", "binary-csv",
         "missing-script", "shrink-with-srun"],
)
def test_cli_exits_2_without_traceback(
    words: list[str | bytes], grid: bytes | None, needle: bytes, tmp_path: Path
) -> None:
    if grid is not None:
        (tmp_path / str(words[2])).write_bytes(grid)
    proc = run_cli(words, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert b"Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1 and "HINT: " in lines[0] and needle in proc.stderr, proc.stderr
    assert proc.stdout == b""
