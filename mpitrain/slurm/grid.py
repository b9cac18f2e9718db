"""Sweep grids: a small TOML or CSV file -> one argument list per job-array task.

Every key must be a training option's full name, every value a scalar of the option's type;
each task's flags are then parsed as the trainer will parse them (:mod:`mpitrain.slurm.args`).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from mpitrain.config import coerce
from mpitrain.errors import ConfigError, with_hint
from mpitrain.slurm.args import SWEEP_MANAGED, check_text, check_train_args, train_parser

_KEY = re.compile(r"[a-z][a-z0-9_-]*")
#: options the sweep template sets itself, per task (``config``: one file for all tasks)
RESERVED = frozenset(k.replace("_", "-") for k in SWEEP_MANAGED) | {"config"}
#: Slurm's default MaxArraySize: array indices 0..1000 (`scontrol show config`)
MAX_ARRAY_SIZE = 1001
#: a grid file larger than this is not a hand-written grid
MAX_BYTES = 16 << 20
_TOML_HINT = "write [grid] lr = [0.1, 0.05] (all combinations) or [[run]] lr = 0.1 (one task)"
_SCALARS = (str, int, float)  # bool is an int


def _where(path: Path) -> str:
    return f"grid file {str(path)!r}"


def _options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Return option name (``batch-size``) -> takes no value (a boolean flag)."""
    out: dict[str, bool] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-") and flag != "--help":
                out[flag[2:]] = action.nargs == 0
    return out


def _name(key: object, where: str, options: dict[str, bool]) -> str:
    """Return the option name a grid key stands for (``batch_size`` -> ``batch-size``)."""
    text = key if isinstance(key, str) else repr(key)
    name = text.replace("_", "-")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ConfigError(
            with_hint(
                f"{where}: option name {text!r} is not valid",
                "use training option names like lr, batch_size or batch-size",
            )
        )
    if name in RESERVED:
        raise ConfigError(
            with_hint(f"{where}: option '{name}' is set by the sweep template", "remove it")
        )
    if name not in options:
        known = sorted(k.replace("-", "_") for k in options if k not in RESERVED)
        raise ConfigError(
            with_hint(
                f"{where}: unknown option {key!r} (keys are full option names)",
                f"valid keys: {', '.join(known)}",
            )
        )
    return name


def _words(name: str, value: Any, where: str, boolean: bool) -> list[str]:
    """Return the command-line words for one option value."""
    if boolean:  # read as the trainer reads switches in files and MPITRAIN_* variables
        on = coerce(name.replace("-", "_"), value, where)
        return [f"--{name}" if on else f"--no-{name}"]
    if isinstance(value, bool) or not isinstance(value, _SCALARS):
        kind = "boolean" if isinstance(value, bool) else type(value).__name__
        raise ConfigError(
            with_hint(
                f"{where}: option '{name}' has a {kind} value {value!r}",
                "give a string or a number (true/false only for switches such as scale_lr)",
            )
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(
            with_hint(f"{where}: option '{name}' = {value!r} is not finite", "give a number")
        )
    text = str(value)
    check_text(f"{where}: value of '{name}'", text)
    # '--data=-x': a value that starts with '-' (e.g. -1e-05) is not read as an option
    return [f"--{name}={text}"] if text.startswith("-") else [f"--{name}", text]


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            with_hint(f"{_where(path)}: {exc.strerror or exc}", "check the --grid path")
        ) from None
    if len(data) > MAX_BYTES:
        raise ConfigError(
            with_hint(f"{_where(path)} is over {MAX_BYTES >> 20} MiB", "is it really a grid?")
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            with_hint(
                f"{_where(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                f"offset {exc.start})",
                "save the grid as UTF-8 TOML or CSV",
            )
        ) from None


def _table_values(grid: dict[str, Any], where: str) -> list[list[Any]]:
    """Return each [grid] key's list of values (a scalar is a list of one)."""
    values: list[list[Any]] = []
    for key, value in grid.items():
        if isinstance(value, dict):
            raise ConfigError(
                with_hint(
                    f"{where}: [grid] key {key!r} is a table", "[grid] holds lists of values only"
                )
            )
        options = value if isinstance(value, list) else [value]
        if not options:
            raise ConfigError(
                with_hint(f"{where}: [grid] key {key!r} is an empty list", "give it a value")
            )
        values.append(options)
    return values


def _rows_from_toml(path: Path, max_tasks: int) -> list[dict[str, Any]]:
    where = _where(path)
    try:
        doc = tomllib.loads(_read(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(with_hint(f"{where}: {exc}", "fix the TOML")) from None
    unknown = set(doc) - {"grid", "run"}
    if unknown or not doc:
        raise ConfigError(
            with_hint(
                f"{where}: expected a [grid] table or [[run]] tables, "
                f"got {sorted(unknown) or 'nothing'}",
                _TOML_HINT,
            )
        )
    grid = doc.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(
            with_hint(f"{where}: 'grid' must be a table ([grid]), not {grid!r}", _TOML_HINT)
        )
    runs = doc.get("run", [])
    if isinstance(runs, dict):
        raise ConfigError(
            with_hint(
                f"{where}: 'run' is a single table; runs are an array of tables ([[run]])",
                "write [[run]] (double brackets) before each run",
            )
        )
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(
            with_hint(f"{where}: 'run' must be [[run]] tables, not {runs!r}", _TOML_HINT)
        )
    values = _table_values(grid, where)
    count = (math.prod(len(v) for v in values) if values else 0) + len(runs)
    _check_count(path, count, max_tasks)
    rows: list[dict[str, Any]] = []
    if values:
        keys = list(grid)
        rows += [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    return rows + runs


def _rows_from_csv(path: Path) -> list[dict[str, Any]]:
    where = _where(path)
    try:
        lines = list(csv.reader(io.StringIO(_read(path), newline="")))
    except csv.Error as exc:
        raise ConfigError(with_hint(f"{where}: {exc}", "fix the CSV")) from None
    records = [(n, r) for n, r in enumerate(lines, 1) if r]  # blank lines are skipped
    if not records:
        return []
    _, header = records[0]
    for key in header:
        if header.count(key) > 1:
            raise ConfigError(
                with_hint(f"{where}: column {key!r} appears twice", "keep one column per option")
            )
    rows: list[dict[str, Any]] = []
    for n, row in records[1:]:
        if len(row) != len(header):
            raise ConfigError(
                with_hint(
                    f"{where} row {n}: {len(row)} values for {len(header)} header columns",
                    "give every row one value per header column",
                )
            )
        rows.append(dict(zip(header, row, strict=True)))
    return rows


def _check_count(path: Path, count: int, max_tasks: int) -> None:
    if count > max_tasks:
        raise ConfigError(
            with_hint(
                f"{_where(path)} makes {count} runs, more than the job-array limit {max_tasks}",
                f"Slurm's default MaxArraySize is {MAX_ARRAY_SIZE} (`scontrol show config | "
                "grep MaxArraySize`): split the grid, or pass --max-array-size N if your "
                "site allows more",
            )
        )


def load_grid(path: Path, *, max_tasks: int = MAX_ARRAY_SIZE) -> list[list[str]]:
    """Read a grid file and return one list of training flags per array task.

    TOML: ``[grid]`` with lists (all combinations, last key varying fastest) and/or
    ``[[run]]`` tables (one task each). CSV: a header of option names, one row per task.
    The number of tasks is checked before the combinations are built.

    Raises:
        ConfigError: unreadable or malformed file, unknown or reserved option names, values
            of the wrong type, more tasks than ``max_tasks``, or no task at all.
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".csv"):
        raise ConfigError(
            with_hint(f"{_where(path)}: unknown kind '{suffix}'", "use a .toml or .csv file")
        )
    if suffix == ".csv":
        rows = _rows_from_csv(path)
        _check_count(path, len(rows), max_tasks)
    else:
        rows = _rows_from_toml(path, max_tasks)
    if not rows:
        raise ConfigError(with_hint(f"{_where(path)} has no runs", "add at least one row"))
    parser = train_parser()
    options = _options(parser)
    out: list[list[str]] = []
    for i, row in enumerate(rows):
        where = f"{_where(path)} task {i}"
        words: list[str] = []
        seen: dict[str, str] = {}
        for key, value in row.items():
            name = _name(key, where, options)
            if name in seen:
                raise ConfigError(
                    with_hint(
                        f"{where}: keys {seen[name]!r} and {key!r} both name --{name}",
                        "keep one of them",
                    )
                )
            seen[name] = key
            words += _words(name, value, where, options[name])
        check_train_args(words, where, SWEEP_MANAGED, parser)
        out.append(words)
    return out
