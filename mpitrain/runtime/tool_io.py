"""The command-line tools' own files: read an input, or refuse an unusable output, in one line.

Reading: every ``OSError`` (missing, a directory, no permission), gzip or non-UTF-8 bytes and
malformed JSON becomes one error that names the file and says why, with a HINT; the error
class is the command's own (``CheckpointError``, ``DataError``, ``ConfigError`` ...) so its
exit code stays. :class:`Fields` then checks the parsed document's structure field by field
(``'files[1].sha256' must be a string, got an integer 5``).

Writing: :func:`check_output_file` and :func:`check_output_dir` refuse, before any work, a
target that is a directory (or not a directory), lies under a regular file, or sits where no
file can be created; missing parent directories are created, as ``--checkpoint-dir`` is.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, NoReturn

from mpitrain.errors import ConfigError, DataError, MpitrainError, with_hint
from mpitrain.runtime.files import temporary_name

ErrorType = type[MpitrainError]
GZIP_MAGIC = b"\x1f\x8b"


def os_reason(exc: OSError) -> str:
    """Say in words why an operation on a path failed."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, NotADirectoryError):
        return "lies under something that is not a directory"
    if isinstance(exc, PermissionError):
        return "cannot be opened: permission denied"
    return f"cannot be read: {exc.strerror or exc}"


def read_bytes(path: Path, what: str, *, hint: str, error: ErrorType = DataError,
               gunzip: bool = False) -> bytes:
    """Return the bytes of ``path`` (decompressed when ``gunzip`` and the file is gzip).

    Raises:
        error: one line naming ``what`` and ``path``: missing, a directory, unreadable, or a
            damaged gzip file.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise error(with_hint(f"{what} '{path}' {os_reason(exc)}", hint)) from None
    if gunzip and data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise error(with_hint(f"{what} '{path}' is a damaged gzip file ({exc})",
                                  hint)) from None
    return data


def decode_text(data: bytes, path: Path, what: str, *, hint: str,
                error: ErrorType = DataError) -> str:
    """Decode UTF-8 (a leading byte-order mark is dropped); gzip is named as such."""
    if data[:2] == GZIP_MAGIC:
        raise error(with_hint(f"{what} '{path}' is gzip-compressed, not text",
                              f"decompress it first (gunzip -k '{path}')"))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(with_hint(f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                              f"at offset {exc.start})", hint)) from None


def read_text(path: Path, what: str, *, hint: str, error: ErrorType = DataError,
              gunzip: bool = False) -> str:
    """Return the UTF-8 text of ``path`` (see :func:`read_bytes` and :func:`decode_text`)."""
    data = read_bytes(path, what, hint=hint, error=error, gunzip=gunzip)
    return decode_text(data, path, what, hint=hint, error=error)


def parse_json(text: str, path: Path, what: str, *, hint: str,
               error: ErrorType = DataError) -> Any:
    """Parse JSON text read from ``path``; malformed or too deeply nested is one line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(with_hint(f"{what} '{path}' is not valid JSON ({exc.msg} at line "
                              f"{exc.lineno} column {exc.colno})", hint)) from None
    except RecursionError:
        raise error(with_hint(f"{what} '{path}' is nested too deeply", hint)) from None


def read_json(path: Path, what: str, *, hint: str, error: ErrorType = DataError,
              gunzip: bool = False) -> Any:
    """Return the parsed JSON document in ``path`` (any failure: one line naming it)."""
    text = read_text(path, what, hint=hint, error=error, gunzip=gunzip)
    return parse_json(text, path, what, hint=hint, error=error)


def kind_of(value: object) -> str:
    """Name a JSON value's kind the way a user reads the file ("a list", "null")."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def _show(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float) else ""
    return f" {text[:40]}" if text else ""


class Fields:
    """Typed access to a parsed JSON document: the wrong kind of value fails naming the file
    and the field's key (``files[1].sha256``)."""

    def __init__(self, path: Path, what: str, *, hint: str, error: ErrorType = DataError) -> None:
        self.path = path
        self.what = what
        self.hint = hint
        self.error = error

    def fail(self, key: str, problem: str) -> NoReturn:
        """Raise the command's error for field ``key`` (empty: the whole document)."""
        where = f"'{key}' " if key else ""
        raise self.error(with_hint(f"{self.what} '{self.path}': {where}{problem}", self.hint))

    def need(self, obj: dict[str, Any], name: str, key: str = "") -> Any:
        """Return ``obj[name]``; a missing field fails naming ``key.name``."""
        if name not in obj:
            self.fail(f"{key}.{name}" if key else name, "is missing")
        return obj[name]

    def as_obj(self, value: object, key: str = "") -> dict[str, Any]:
        """``value`` as a JSON object."""
        if not isinstance(value, dict):
            self.fail(key, f"must be a JSON object, not {kind_of(value)}")
        return value

    def as_list(self, value: object, key: str, length: int | None = None) -> list[Any]:
        """``value`` as a JSON list (of ``length`` items when given)."""
        if not isinstance(value, list):
            self.fail(key, f"must be a list, not {kind_of(value)}")
        if length is not None and len(value) != length:
            self.fail(key, f"must hold {length} items, holds {len(value)}")
        return value

    def as_str(self, value: object, key: str) -> str:
        """``value`` as a string."""
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {kind_of(value)}{_show(value)}")
        return value

    def as_bool(self, value: object, key: str) -> bool:
        """``value`` as true or false."""
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {kind_of(value)}{_show(value)}")
        return value

    def as_int(self, value: object, key: str, lo: int = 0, hi: int = 2**62) -> int:
        """``value`` as an integer in ``[lo, hi]``."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {kind_of(value)}{_show(value)}")
        if not lo <= value <= hi:
            self.fail(key, f"must be in [{lo}, {hi}], got {value}")
        return value

    def as_num(self, value: object, key: str, lo: float = -math.inf) -> float:
        """``value`` as a finite number >= ``lo``."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number, not {kind_of(value)}{_show(value)}")
        if not math.isfinite(value) or value < lo:
            self.fail(key, f"must be a finite number >= {lo:g}, got {value}")
        return float(value)


def _refuse(option: str, path: Path, problem: str, hint: str) -> NoReturn:
    raise ConfigError(with_hint(f"{option} '{path}' {problem}", hint))


def _usable_dir(directory: Path, option: str, target: Path, hint: str) -> None:
    """Create ``directory`` (and parents) if needed and prove a file can be created in it."""
    here = Path(os.path.abspath(directory))
    for up in (here, *here.parents):
        if os.path.lexists(up):
            if not up.is_dir():
                _refuse(option, target, f"lies under '{up}', which is not a directory", hint)
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _refuse(option, target, f"cannot be written: its directory '{directory}' cannot be "
                f"created ({exc.strerror or exc})", hint)
    probe = temporary_name(directory / "mpitrain-probe")
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        _refuse(option, target, f"is not writable: {exc.strerror or exc}", hint)


def check_output_file(path: Path, option: str, *,
                      hint: str = "give a file name in a writable directory",
                      example: str = "out") -> Path:
    """Refuse, before the work, a file target that could not be written; return ``path``.

    ``path`` must not be a directory or a device (an atomic write would replace it), and
    its directory must be creatable and writable (missing parents are created). ``example``
    is the file name a directory ``path`` is told to add.

    Raises:
        ConfigError: naming ``option`` and ``path`` (exit code 2, like a bad option).
    """
    path = Path(path)
    if path.is_dir():
        _refuse(option, path, "is a directory", f"give a file name, e.g. '{path / example}'")
    if path.exists() and not path.is_file():
        _refuse(option, path, "is not a regular file (it would be replaced)", hint)
    return check_output_place(path, option, hint=hint)


def check_output_place(path: Path, option: str, *,
                       hint: str = "give a path in a writable directory") -> Path:
    """Refuse a target whose directory cannot be created or written; return ``path``.

    What ``path`` itself may be (a new name, an empty directory ...) is the caller's rule;
    this proves only that something can be created beside it (missing parents are created).

    Raises:
        ConfigError: naming ``option`` and ``path``.
    """
    path = Path(path)
    _usable_dir(path.parent, option, path, hint)
    return path


def check_output_dir(path: Path, option: str, *,
                     hint: str = "give a directory that can be created and written") -> Path:
    """Refuse, before the work, a directory target that is unusable; create it; return it.

    Raises:
        ConfigError: naming ``option`` and ``path`` (exit code 2, like a bad option).
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        _refuse(option, path, "is not a directory", hint)
    _usable_dir(path, option, path, hint)
    return path
