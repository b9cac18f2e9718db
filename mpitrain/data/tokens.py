"""Token data's facts in a manifest: its vocabulary, its tokenizer and the files beside it.

``data_tools tokenize`` (and ``convert --vocab``) record them in the manifest's ``params``:
``vocab`` (the token ids lie in ``[0, vocab)``: what a language model embeds), ``tokenizer``
(``kind`` byte or bpe, the learned ``vocab_size`` and, for bpe, the ``file`` beside the shards
and its ``sha256``) and ``extra_files`` (name -> SHA-256 of every file the dataset holds
beside its shards and splits). These helpers read them back, checking types, so a damaged
manifest is one DataError naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mpitrain.data.manifest import MANIFEST, Manifest
from mpitrain.errors import DataError, with_hint
from mpitrain.runtime.files import name_problem

#: the tokenizer file data_tools tokenize writes beside the shards (Hugging Face format)
TOKENIZER_FILE = "tokenizer.json"
#: the byte-level vocabulary (the built-in corpus, ``--tokenizer byte``)
BYTE_VOCAB = 256
#: the largest vocabulary a dataset may declare: the loader hands token ids over as float32,
#: which holds every integer below 2**24 exactly
MAX_VOCAB = 1 << 24
_SHA = re.compile(r"^[0-9a-f]{64}$")
_HINT = "re-create the dataset with: python -m data_tools tokenize ..."


def _fail(directory: Path | None, key: str, problem: str) -> DataError:
    where = f"manifest '{directory / MANIFEST}'" if directory is not None else "the manifest"
    return DataError(with_hint(f"{where}: field 'params.{key}' {problem}", _HINT))


def declared_vocab(manifest: Manifest, directory: Path | None = None) -> int | None:
    """The vocabulary the manifest declares (``params.vocab``), or None for other data."""
    value = manifest.params.get("vocab")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VOCAB:
        raise _fail(directory, "vocab", f"must be an integer in [1, {MAX_VOCAB}], got {value!r}")
    return value


def extra_files(manifest: Manifest, directory: Path | None = None) -> dict[str, str]:
    """The files beside the shards that the manifest names (``params.extra_files``: name ->
    SHA-256); plain names only."""
    raw = manifest.params.get("extra_files", {})
    if not isinstance(raw, dict):
        raise _fail(directory, "extra_files", "must be an object of file name -> SHA-256")
    for name, sha in raw.items():
        problem = name_problem(name) or ("is the manifest" if name == MANIFEST else None)
        if problem:
            raise _fail(directory, "extra_files", f"names {name!r}, which {problem}")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise _fail(directory, f"extra_files.{name}", "must be 64 lowercase hex digits")
    return dict(raw)


def tokenizer_of(manifest: Manifest) -> dict[str, Any] | None:
    """The ``params.tokenizer`` record (kind, vocab_size, file, sha256), None if absent."""
    value = manifest.params.get("tokenizer")
    return dict(value) if isinstance(value, dict) else None


def token_identity(manifest: Manifest, directory: Path | None = None) -> dict[str, Any] | None:
    """What tells token data apart for a resume: its vocabulary and its tokenizer (the
    tokenizer file's SHA-256, or its kind); None for data that declares no vocabulary."""
    vocab = declared_vocab(manifest, directory)
    if vocab is None:
        return None
    tok = tokenizer_of(manifest) or {}
    return {"vocab": vocab, "tokenizer": tok.get("sha256") or tok.get("kind")}


def describe_identity(identity: dict[str, Any] | None) -> str:
    """``identity`` in words, for a refusal."""
    if identity is None:
        return "no declared token vocabulary"
    tok = identity.get("tokenizer")
    how = ("an unnamed tokenizer" if tok is None else
           f"tokenizer {tok}" if len(str(tok)) < 20 else f"tokenizer.json sha256 {str(tok)[:12]}")
    return f"a vocabulary of {identity.get('vocab')} tokens ({how})"


def check_identity(saved: dict[str, Any] | None, now: dict[str, Any] | None,
                   directory: Path) -> None:
    """Refuse to resume a position in token data ``saved`` on other data ``now``."""
    if saved is None or saved == now:
        return
    raise DataError(with_hint(
        f"the checkpoint was trained on token data of {describe_identity(saved)}; this run's "
        f"data '{directory}' has {describe_identity(now)}",
        "resume with the --data it was trained on, or start a fresh run in another "
        "--checkpoint-dir"))
