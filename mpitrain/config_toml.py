"""`python -m mpitrain config --print [options]`: the resolved configuration as TOML.

Options set by a flag, a variable or a file are written as keys, each marked with where it
came from; the others are written commented out with their default, so that reading the file
back with ``--config`` gives the same configuration (and the same set of options the user
chose, which decides the tuned defaults that a run applies at start).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from mpitrain.config import SECTIONS, TrainConfig, option_fields
from mpitrain.config_args import build_parser
from mpitrain.config_sources import resolve_sources
from mpitrain.errors import ConfigError, with_hint

DESCRIPTION = """\
Print the configuration a run with these options would use, as TOML:
  python -m mpitrain config --print --optimizer adam --epochs 3 > run.toml
  mpiexec -n 4 python -m mpitrain --config run.toml
Values set by flags, MPITRAIN_* variables or --config are keys (marked with their source);
defaults are commented out. Tuned defaults that depend on the number of ranks (--exchange
modes, --model gpt) are applied, and printed, when the run starts."""


def toml_value(value: Any) -> str:
    """Return ``value`` (bool, int, finite float or str) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML has no {value!r}")
        return repr(value)
    # a TOML basic string: JSON's escapes are TOML's, plus DEL, which TOML wants escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def render(cfg: TrainConfig, sources: dict[str, str], command: str = "") -> str:
    """Return ``cfg`` as TOML, options grouped by ``--help`` section, sources as comments."""
    lines = ["# mpitrain configuration" + (f": {command}" if command else ""),
             "# keys: set by a flag, a variable or a file; commented out: defaults"]
    fields = option_fields()
    for section in SECTIONS:
        lines += ["", f"# --- {section} ---"]
        for name, f in fields.items():
            if f.metadata["section"] != section:
                continue
            value, source = getattr(cfg, name), sources[name]
            if value is None:
                lines.append(f"# {name} =  # unset ({source})")
            elif source.startswith("default"):
                lines.append(f"# {name} = {toml_value(value)}  # {source}")
            else:
                lines.append(f"{name} = {toml_value(value)}  # from {source}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """Run the config command; returns the exit code."""
    parser = build_parser("python -m mpitrain config", DESCRIPTION)
    parser.add_argument("--print", dest="print_", action="store_true",
                        help="print the resolved configuration as TOML")
    ns = vars(parser.parse_args(list(argv)))
    if not ns.pop("print_"):
        raise ConfigError(with_hint("the config command needs --print",
                                    "python -m mpitrain config --print [options]"))
    cfg, sources = resolve_sources(ns)
    command = shlex.join(["python", "-m", "mpitrain", "config", *argv])
    command = "".join(c if c.isprintable() else "?" for c in command)  # one comment line
    sys.stdout.write(render(cfg, sources, command))
    return 0
