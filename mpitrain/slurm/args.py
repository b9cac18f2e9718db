"""Check values before they reach a script: control characters, and training flags read the
way the trainer's argparse will read them (abbreviations, ``--opt=value``, ``-h``).

The trainer's parser is ``argparse.ArgumentParser`` plus :func:`mpitrain.config.add_arguments`
(``mpitrain.train.run.build_parser``); :func:`train_parser` builds the same one here, because
``mpitrain.train`` imports this package. A unit test holds the two to the same options.
"""

from __future__ import annotations

import argparse
import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from mpitrain.config import add_arguments, coerce, valid_keys
from mpitrain.errors import ConfigError, with_hint

#: training options the training templates set themselves -> why
MANAGED: dict[str, str] = {
    "checkpoint_dir": "use the renderer's --checkpoint-dir",
    "resume": "the script adds --resume auto after a requeue",
    "on_rank_loss": "use the renderer's --on-rank-loss (train templates): shrink also launches "
                    "with mpirun --with-ft ulfm and keeps the allocation (#SBATCH --no-kill)",
}
#: and the sweep template, once per array task
SWEEP_MANAGED: dict[str, str] = {
    **MANAGED,
    "run_dir": "each array task gets SWEEP_DIR/task-N (--sweep-dir)",
    "summary_json": "each task writes SWEEP_DIR/task-N/summary.json",
}
_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte"}
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def bad_character(text: str, *, code: bool = False) -> str | None:
    """Describe the first character of ``text`` no rendered value may hold, else None.

    Refused: C0/C1 control characters, line and paragraph separators, bidirectional-text
    controls (they make a script read differently from what runs) and lone surrogates
    (bytes that were not UTF-8). ``code`` (the env-setup block) may hold tabs and newlines.
    """
    for ch in text:
        if code and ch in "\t\n":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return "bytes that are not UTF-8"
        if cat in ("Cc", "Zl", "Zp") or ch in _BIDI:
            return _NAMES.get(ch, f"the control character U+{ord(ch):04X}")
    return None


def character_hint(found: str) -> str:
    """Return the fix for what :func:`bad_character` found."""
    if "UTF-8" in found:
        return "pass UTF-8 text (check the terminal's or the file's encoding)"
    return "remove newlines and control characters"


def check_text(what: str, value: str, *, code: bool = False) -> None:
    """Raise ConfigError when ``value`` (named ``what``) holds a character it may not."""
    found = bad_character(value, code=code)
    if found is not None:
        raise ConfigError(with_hint(f"{what} {value!r} has {found}", character_hint(found)))


class _ParseError(Exception):
    """argparse wanted to print an error (or help) and exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ParseError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParseError(message or f"exit {status}")


def train_parser() -> argparse.ArgumentParser:
    """Return a parser that reads training flags exactly as ``python -m mpitrain`` does.

    Same options and ``allow_abbrev`` as the trainer's; ``-h/--help`` is recorded instead of
    printed and errors raise instead of exiting.
    """
    parser = _Parser(prog="python -m mpitrain", add_help=False)
    parser.add_argument("-h", "--help", action="store_true", default=argparse.SUPPRESS)
    add_arguments(parser)
    return parser


def _flag_of(parser: argparse.ArgumentParser, word: str) -> str | None:
    """Return the option string argparse reads ``word`` as (abbreviations too), else None."""
    if not word.startswith("-"):
        return None
    flag = word.split("=", 1)[0]
    known = parser._option_string_actions
    if flag in known:
        return flag
    hits = [o for o in known if flag.startswith("--") and o.startswith(flag)]
    return hits[0] if len(hits) == 1 else None


def spelled(parser: argparse.ArgumentParser, words: Sequence[str], dest: str) -> str:
    """Return how ``words`` spelled the option with ``dest`` (e.g. ``--re`` for resume)."""
    for word in words:
        flag = _flag_of(parser, word)
        if flag is not None and parser._option_string_actions[flag].dest == dest:
            return word.split("=", 1)[0]
    return "--" + dest.replace("_", "-")


def check_train_args(
    words: Sequence[str],
    where: str,
    managed: Mapping[str, str],
    parser: argparse.ArgumentParser | None = None,
) -> dict[str, Any]:
    """Parse ``words`` as the trainer will; refuse errors and options the template sets.

    Args:
        words: the training flags, one word each.
        where: what they are, for the message ("training arguments", "grid file 'g' task 3").
        managed: option dest -> why the template sets it.
        parser: a :func:`train_parser` to reuse.

    Returns:
        The options given, as ``{dest: value}`` with their types checked.

    Raises:
        ConfigError: naming the word, what argparse makes of it, and a fix.
    """
    parser = parser or train_parser()
    if "--" in words:
        raise ConfigError(
            with_hint(
                f"{where}: '--' ends the trainer's options, so the flags the script adds "
                "after them (--checkpoint-dir, --resume) would be refused",
                "remove the '--'",
            )
        )
    try:
        given = vars(parser.parse_args(list(words)))
    except _ParseError as exc:
        raise ConfigError(
            with_hint(f"{where}: {exc}", "see `python -m mpitrain --help` for the flags")
        ) from None
    if "help" in given:
        raise ConfigError(
            with_hint(
                f"{where}: '{spelled(parser, words, 'help')}' would print the trainer's help "
                "and run nothing",
                "remove it; see `python -m mpitrain --help` here",
            )
        )
    for dest, why in managed.items():
        if dest in given:
            word = spelled(parser, words, dest)
            full = "--" + dest.replace("_", "-")
            what = f"'{word}'" + ("" if word == full else f" (argparse reads it as {full})")
            raise ConfigError(with_hint(f"{where}: {what} is set by the template", why))
    options = set(valid_keys())  # not --config: a file path, read by the trainer in the job
    for dest, value in given.items():
        if dest not in options:
            continue
        typed = coerce(dest, value, where)
        if isinstance(typed, float) and not math.isfinite(typed):
            raise ConfigError(
                with_hint(
                    f"{where}: option '{dest}' = {value!r} is not a finite number",
                    "give a finite value",
                )
            )
    return given
