"""What option values are accepted, and how text and TOML values become typed values.

:mod:`mpitrain.config` declares per option which of these rules apply (field metadata);
everything here is pure and raises :class:`~mpitrain.errors.ConfigError` with one line that
names the option, the value and what is accepted.
"""

from __future__ import annotations

import math
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpitrain.errors import ConfigError, with_hint

#: a config file larger than this is not a hand-written config (``--config /dev/zero``)
MAX_CONFIG_BYTES = 1 << 20
_SHOWN = 80  # characters of a bad value quoted in an error


@dataclass(frozen=True)
class Range:
    """The finite numbers an option accepts: ``lo`` to ``hi``, open ends excluded.

    ``off`` is one more accepted value outside the interval that turns the feature off (or
    means what ``off_label`` says, e.g. ``auto``).
    """

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    off: float | None = None
    off_label: str = "off"

    def contains(self, value: float) -> bool:
        """Return True when ``value`` is accepted."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.off is not None and value == self.off:
            return True
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        """Say what is accepted: ``an integer in [1, 1000000]``."""
        interval = (
            f"{'(' if self.lo_open else '['}{_number(self.lo)}, "
            f"{_number(self.hi)}{')' if self.hi_open else ']'}"
        )
        text = f"{'an integer' if integer else 'a finite number'} in {interval}"
        return text if self.off is None else f"{_number(self.off)} ({self.off_label}) or {text}"


@dataclass(frozen=True)
class OptimizerDefault:
    """An optimizer's lr when none is given, and how ``--scale-lr`` grows an lr with the batch.

    ``scaling`` is ``linear`` (SGD: lr x global batch / batch-size) or ``sqrt`` (Adam: the
    square-root rule, lr x sqrt(global batch / batch-size)).
    """

    lr: float
    scaling: str

    def factor(self, ratio: float) -> float:
        """Return the lr multiplier for a global batch ``ratio`` times ``--batch-size``."""
        return ratio if self.scaling == "linear" else math.sqrt(ratio)


#: what ``--optimizer X`` uses when ``--lr`` is not given (measured on the demo, with the
#: scaling rule that keeps it at 1 to 8 ranks; docs/design.md "Defaults that fit the choice")
OPTIMIZER_DEFAULTS = {
    "sgd": OptimizerDefault(0.05, "linear"),
    "adam": OptimizerDefault(0.006, "sqrt"),
    "adamw": OptimizerDefault(0.006, "sqrt"),
}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---- preemption signals: which ones can stop a run safely ---------------------------------
#: signals a batch system or a user sends to ask for a stop (Slurm: TERM, --signal=USR1 ...)
STOP_SIGNALS = ("HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "XCPU", "ALRM", "PWR")
_REFUSED_SIGNALS: dict[str, str] = {
    **dict.fromkeys(("KILL", "STOP"), "cannot be caught"),
    **dict.fromkeys(
        ("CHLD", "CLD", "CONT", "WINCH", "URG", "PIPE", "TSTP", "TTIN", "TTOU", "IO", "POLL",
         "PROF", "VTALRM", "XFSZ"),
        "fires in normal operation (child exit, resume, terminal or socket events), "
        "so the run would stop when nothing asked it to",
    ),
    **dict.fromkeys(
        ("SEGV", "BUS", "FPE", "ILL", "ABRT", "IOT", "TRAP", "SYS", "STKFLT", "EMT"),
        "reports a crash of the process itself; handling it would hide the crash",
    ),
}


def parse_signals(spec: str, source: str = "the config") -> list[signal.Signals]:
    """Parse ``"USR1,TERM"`` into signals; refuse names that cannot stop a run safely.

    Raises:
        ConfigError: naming the bad entry, why it is refused and the accepted names.
    """
    out: list[signal.Signals] = []
    for raw in spec.split(","):
        short = raw.strip().upper().removeprefix("SIG")
        if not short:
            continue
        sig = signal.Signals.__members__.get("SIG" + short)
        if short in _REFUSED_SIGNALS:
            problem = f"signal {raw.strip()!r} {_REFUSED_SIGNALS[short]}"
        elif sig is None:
            problem = f"unknown signal {raw.strip()!r}"
        elif short not in STOP_SIGNALS:
            problem = f"signal {raw.strip()!r} is not one that asks a run to stop"
        else:
            if sig not in out:
                out.append(sig)
            continue
        raise ConfigError(
            with_hint(
                f"option 'preempt_signals' from {source} has a bad value {show(spec)}: {problem}",
                f"accepted: a comma-separated list of {', '.join(available_stop_signals())} "
                "(or '' for none)",
            )
        )
    return out


def available_stop_signals() -> list[str]:
    """Return the accepted stop-signal names this platform has."""
    return [s for s in STOP_SIGNALS if hasattr(signal.Signals, "SIG" + s)]


def check_signals(value: Any, source: str) -> None:
    """Raise ConfigError unless ``value`` is a usable ``preempt_signals`` list."""
    parse_signals(str(value), source)


_MODEL = re.compile(r"^(mlp|cnn|gpt|llama|gpt2|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


def check_model(value: Any, source: str) -> None:
    """Raise ConfigError unless ``value`` names a built-in model or a ``module:factory``."""
    if not _MODEL.match(value):
        raise ConfigError(
            with_hint(
                f"option 'model' from {source} has a bad value {show(value)}",
                "accepted: mlp, cnn, gpt, llama, gpt2 or package.module:factory",
            )
        )


def check_nonempty(name: str) -> Callable[[Any, str], None]:
    """Return a check that refuses an empty value for path option ``name``."""
    def check(value: Any, source: str) -> None:
        if value is not None and not str(value).strip():
            raise ConfigError(
                with_hint(
                    f"option '{name}' from {source} is empty",
                    "accepted: a non-empty path (or leave the option out)",
                )
            )

    return check


def show(value: Any) -> str:
    """Return ``value`` quoted for an error: its repr (no newlines), at most 80 characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def convert(typ: type, value: Any) -> Any:
    """Return ``value`` as ``typ``; raise ValueError when it is not one.

    Text (flags, variables, and strings in files) is parsed; a typed TOML value must be of the
    option's type (an integral float counts as an integer; a bool is never a number).
    """
    if isinstance(value, str):
        text = value.strip()
        if typ is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(value)
        if typ is int:
            try:
                return int(text)
            except ValueError:
                return convert(typ, float(text))  # "1e3"; "1e400" is inf, refused
        if typ is float:
            return float(text)
        return value
    if isinstance(value, bool):
        if typ is bool:
            return value
        raise ValueError(value)
    if typ is int and isinstance(value, int):
        return value
    if typ is int and isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(value)
    if typ is float and isinstance(value, int | float):
        return float(value)  # OverflowError (a ValueError's sibling) for a huge int
    raise ValueError(value)


def has_type(typ: type, value: Any) -> bool:
    """Return True when ``value`` is a ``typ`` as an option holds it (a bool is not a number)."""
    if isinstance(value, bool):
        return typ is bool
    if typ is float:
        return isinstance(value, int | float)
    return isinstance(value, typ)


def read_config_text(p: Path) -> str:
    """Return the text of config file ``p``; every way it cannot be read is a ConfigError."""
    hint = "give --config (or MPITRAIN_CONFIG) a readable UTF-8 TOML file"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(with_hint(f"config file '{p}' not found", "check --config")) from None
    except OSError as exc:
        raise ConfigError(
            with_hint(f"cannot read config file '{p}': {exc.strerror or exc}", hint)
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(with_hint(f"config file '{p}' is a directory", hint))
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(with_hint(f"config file '{p}' is not a regular file", hint))
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            with_hint(
                f"config file '{p}' has {st.st_size} bytes, more than a config "
                f"({MAX_CONFIG_BYTES} at most)",
                hint,
            )
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            with_hint(f"cannot read config file '{p}': {exc.strerror or exc}", hint)
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            with_hint(f"config file '{p}' is not UTF-8 text (byte {exc.start})", hint)
        ) from None


def read_toml_options(p: Path) -> dict[str, Any]:
    """Return a TOML config file's options (top-level keys, or a [train] table), keys with _.

    Raises:
        ConfigError: unreadable or invalid TOML, a [train] table beside top-level keys, or a
            key given twice (``a-b`` and ``a_b``).
    """
    import tomllib

    where = f"config file '{p}'"
    try:
        data = tomllib.loads(read_config_text(p))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            with_hint(f"{where} is not valid TOML: {exc}", "fix the syntax")
        ) from None
    if isinstance(data.get("train"), dict):
        if len(data) != 1:
            raise ConfigError(
                with_hint(
                    f"{where} has a [train] table and top-level options",
                    "put every option in the [train] table, or none",
                )
            )
        data = data["train"]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in out:
            raise ConfigError(
                with_hint(f"option '{name}' is given twice in {where}", "keep one of them")
            )
        out[name] = (key, value)
    return out
