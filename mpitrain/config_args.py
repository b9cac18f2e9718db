"""The options on the command line: ``--help`` in sections, each option with its choices,
default and ``MPITRAIN_*`` variable.

The section of an option is declared beside it (``_opt(section, ...)`` in
:mod:`mpitrain.config`); the sections are shown in :data:`mpitrain.config.SECTIONS` order.
"""

from __future__ import annotations

import argparse
from typing import Any

from mpitrain import __version__
from mpitrain.config import SECTIONS, option_fields, option_type
from mpitrain.config_values import OPTIMIZER_DEFAULTS

#: how the run-time configuration is layered (shown under each parser's description)
LAYERS = """\
Every option is also an MPITRAIN_<NAME> variable and a key of a TOML file (--config FILE);
flags win over the environment, which wins over the file, which wins over the defaults.
The result: python -m mpitrain config --print [options]"""


def env_name(name: str) -> str:
    """Return the variable that sets option ``name`` (``MPITRAIN_EPOCHS``)."""
    return f"MPITRAIN_{name.upper()}"


def default_text(name: str) -> str:
    """Say what option ``name`` is when nobody sets it."""
    if name == "lr":
        return ", ".join(f"{k} {v.lr:g}" for k, v in OPTIMIZER_DEFAULTS.items())
    default: Any = option_fields()[name].default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    return f"'{default}'" if default == "" else str(default)


def help_text(name: str) -> str:
    """Return option ``name``'s help line: what it does, its default and its variable."""
    text = str(option_fields()[name].metadata["help"])
    if "(default:" not in text:  # said in the help's own words, e.g. --data's built-in digits
        text += f" (default: {default_text(name)}; env {env_name(name)})"
    else:
        text += f" (env {env_name(name)})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option, grouped by section.

    Unset flags stay absent from the namespace so that lower layers (environment, file,
    defaults) can fill them. A choice option shows its choices (``--optimizer {sgd,adam}``).
    """
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="TOML file of options (top-level keys or a [train] table; env MPITRAIN_CONFIG)",
    )
    groups = {s: parser.add_argument_group(f"{s} options") for s in SECTIONS}
    for name, f in option_fields().items():
        group = groups[f.metadata["section"]]
        flag = "--" + name.replace("_", "-")
        if option_type(name) is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text(name),
            )
            continue
        choices = f.metadata["choices"]
        group.add_argument(
            flag, dest=name, default=argparse.SUPPRESS, type=str, choices=choices,
            metavar=None if choices else name.upper(), help=help_text(name),
        )


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Return a parser of every option and ``--version``, its ``--help`` led by ``description``.

    (Not in :func:`add_arguments`: the Slurm renderer reads a job's training flags with that
    parser, where ``--version`` would end the rendering.)
    """
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [options]", description=f"{description}\n\n{LAYERS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpitrain {__version__}")
    add_arguments(parser)
    return parser
