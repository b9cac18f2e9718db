"""Where option values come from: a TOML file, MPITRAIN_* variables and flags, merged once.

CLI > environment > file > defaults; every value is type- and range-checked where it is read
(:func:`mpitrain.config.coerce`), so an error names its source. :func:`mpitrain.config.resolve`
is this without the sources.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpitrain.config import TrainConfig, coerce, option_fields, valid_keys, validate
from mpitrain.config_values import OPTIMIZER_DEFAULTS, read_toml_options
from mpitrain.errors import ConfigError, with_hint
from mpitrain.runtime import env


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(
        with_hint(
            f"unknown option '{key}' in {source}", f"{hint}valid keys: {', '.join(valid_keys())}"
        )
    )


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (top-level keys, or a [train] table); keys may use - or _."""
    p = Path(path)
    where = f"config file '{p}'"
    out: dict[str, Any] = {}
    fields = option_fields()
    for name, (key, value) in read_toml_options(p).items():
        if name not in fields:
            raise _unknown(key, where)
        out[name] = coerce(name, value, where)
    return out


def resolve_sources(
    cli: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[TrainConfig, dict[str, str]]:
    """Like :func:`mpitrain.config.resolve`, and say where each option's value came from.

    Returns:
        The config and, for every option, its source: a flag (``--epochs``), a variable
        (``MPITRAIN_EPOCHS``), ``config file 'PATH'``, or ``default`` (``default for
        --optimizer adam`` for an optimizer's lr).
    """
    fields = option_fields()
    values: dict[str, Any] = {}
    sources = dict.fromkeys(fields, "default")
    cli = dict(cli)
    variables = env.config_vars(environ)
    file_path = cli.pop("config", None)
    source = "--config"
    if file_path is None:
        file_path, source = variables.get("config"), "MPITRAIN_CONFIG"
    if file_path is not None:
        if not str(file_path).strip():
            raise ConfigError(with_hint(f"{source} is empty", "give a TOML file or leave it out"))
        values.update(load_file(file_path))
        sources.update(dict.fromkeys(values, f"config file '{file_path}'"))
    for key, raw in variables.items():
        if key == "config":
            continue
        if key not in fields:
            raise _unknown(f"MPITRAIN_{key.upper()}", "the environment")
        values[key] = coerce(key, raw, f"MPITRAIN_{key.upper()}")
        sources[key] = f"MPITRAIN_{key.upper()}"
    for key, raw in cli.items():
        if key not in fields:
            raise _unknown(key, "the command line")
        flag = f"--{'no-' if raw is False else ''}{key.replace('_', '-')}"
        values[key] = coerce(key, raw, flag)
        sources[key] = flag
    explicit = ",".join(sorted(values))
    if "lr" not in values:
        optimizer = values.get("optimizer", fields["optimizer"].default)
        values["lr"] = OPTIMIZER_DEFAULTS[optimizer].lr
        sources["lr"] = f"default for --optimizer {optimizer}"
    return validate(TrainConfig(**values, explicit=explicit)), sources
