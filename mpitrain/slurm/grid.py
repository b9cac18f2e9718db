"""Sweep grids: a small TOML or CSV file -> one argument list per job-array task."""

from __future__ import annotations

import csv
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

from mpitrain.errors import ConfigError, with_hint

_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: options the sweep template sets itself, per task
RESERVED = frozenset({"run-dir", "summary-json", "checkpoint-dir", "resume", "config"})
#: more tasks than this is almost certainly a mistake in the grid
MAX_TASKS = 10000


def _flag(key: str, value: Any, where: str) -> list[str]:
    """Return the command-line words for one option value."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConfigError(
            with_hint(
                f"{where}: option name {key!r} is not valid",
                "use training option names like lr, batch_size or batch-size",
            )
        )
    name = key.replace("_", "-")
    if name in RESERVED:
        raise ConfigError(
            with_hint(f"{where}: option '{name}' is set by the sweep template", "remove it")
        )
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return [f"--{name}" if value.lower() == "true" else f"--no-{name}"]
    if not isinstance(value, str | int | float):
        raise ConfigError(
            with_hint(
                f"{where}: option '{name}' has a {type(value).__name__} value",
                "use strings, numbers or booleans",
            )
        )
    text = str(value)
    if _CONTROL.search(text):
        raise ConfigError(
            with_hint(
                f"{where}: option '{name}' value {text!r} has control characters",
                "remove them",
            )
        )
    return [f"--{name}", text]


def _rows_from_toml(path: Path) -> list[dict[str, Any]]:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(with_hint(f"grid file '{path}': {exc}", "fix the TOML")) from None
    unknown = set(doc) - {"grid", "run"}
    if unknown or not doc:
        raise ConfigError(
            with_hint(
                f"grid file '{path}': expected a [grid] table or [[run]] tables, "
                f"got {sorted(unknown) or 'nothing'}",
                "write [grid] lr = [0.1, 0.05] (all combinations) or [[run]] lr = 0.1 (one task)",
            )
        )
    rows: list[dict[str, Any]] = []
    grid = doc.get("grid", {})
    if grid:
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        rows += [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    rows += list(doc.get("run", []))
    return rows


def _rows_from_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
    except (OSError, csv.Error) as exc:
        raise ConfigError(with_hint(f"grid file '{path}': {exc}", "fix the CSV")) from None
    for i, r in enumerate(rows):
        if None in r or any(v is None for v in r.values()):
            raise ConfigError(
                with_hint(f"grid file '{path}' row {i + 2}: wrong number of columns", "fix the row")
            )
    return rows


def load_grid(path: Path) -> list[list[str]]:
    """Read a grid file and return one list of training flags per array task.

    TOML: ``[grid]`` with lists (all combinations, last key varying fastest) and/or
    ``[[run]]`` tables (one task each). CSV: a header of option names, one row per task.

    Raises:
        ConfigError: unreadable file, bad option names or values, or an empty grid.
    """
    rows = _rows_from_csv(path) if path.suffix.lower() == ".csv" else _rows_from_toml(path)
    if not rows:
        raise ConfigError(with_hint(f"grid file '{path}' has no runs", "add at least one row"))
    if len(rows) > MAX_TASKS:
        raise ConfigError(
            with_hint(f"grid file '{path}' has {len(rows)} runs", f"keep it under {MAX_TASKS}")
        )
    out: list[list[str]] = []
    for i, row in enumerate(rows):
        words: list[str] = []
        for key, value in row.items():
            words += _flag(key, value, f"grid file '{path}' task {i}")
        out.append(words)
    return out
