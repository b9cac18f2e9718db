"""``data_tools tokenize``: UTF-8 text files -> windows of token ids for the language models.

The files (paths, directories read recursively, or globs) are read in order and tokenized
each on its own: ``byte`` takes their UTF-8 bytes as ids 0..255; ``bpe`` learns a byte-level
BPE of ``--vocab-size`` tokens from them with Hugging Face ``tokenizers`` (here, from this
text: nothing is downloaded) and saves it as ``tokenizer.json`` beside the shards. The
concatenated ids are split by position (the last ``--test-percent`` % of the tokens are the
test split) and each split is cut into windows of ``context + 1`` ids with stride
``context``, as the built-in corpus (:mod:`mpitrain.data.corpus`), written by the same writer.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpitrain.data.corpus import labelled_windows
from mpitrain.data.reader import token_dtype
from mpitrain.data.tokens import BYTE_VOCAB, MAX_VOCAB, TOKENIZER_FILE
from mpitrain.data.writer import check_target, write_dataset
from mpitrain.errors import DataError, with_hint

TOKENIZERS = ("byte", "bpe")
INPUT_HINT = "pass UTF-8 text files, a directory of them, or a quoted glob such as 'texts/*.txt'"
_MAGIC = re.compile(r"[*?[]")


@dataclass
class Texts:
    """The text read: each file's display name and contents (empty files left out)."""

    names: list[str]
    data: list[bytes]
    skipped_empty: int


def _files_under(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` (hidden names skipped), sorted by path."""
    return sorted(
        f for f in directory.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    )


def collect_inputs(items: Sequence[str]) -> list[Path]:
    """The text files ``items`` name (files, directories, globs), each once, in order.

    Raises:
        DataError: an item that does not exist, is not a file or directory, or finds no file.
    """
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = _files_under(path)
            if not files:
                raise DataError(with_hint(f"text directory '{item}' holds no files", INPUT_HINT))
        elif path.is_file():
            files = [path]
        elif os.path.lexists(path):
            raise DataError(with_hint(f"text input '{item}' is not a regular file",
                                      INPUT_HINT))
        elif _MAGIC.search(item):
            files = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not files:
                raise DataError(with_hint(f"text input '{item}' matches no file", INPUT_HINT))
        else:
            raise DataError(with_hint(f"text input '{item}' does not exist", INPUT_HINT))
        found.extend(files)
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def read_texts(files: Sequence[Path]) -> Texts:
    """Read ``files`` as UTF-8 text, leaving out empty ones.

    Raises:
        DataError: a file that cannot be read or is not UTF-8 (naming the byte and offset),
            or no text at all.
    """
    names, data, empty = [], [], 0
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as exc:
            raise DataError(with_hint(f"cannot read text file '{f}': {exc.strerror or exc}",
                                      "check its permissions")) from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(with_hint(
                f"text file '{f}' is not UTF-8 (byte {raw[exc.start]:#04x} at offset "
                f"{exc.start})", "convert it to UTF-8, or leave it out")) from None
        if raw:
            names.append(str(f))
            data.append(raw)
        else:
            empty += 1
    if not data:
        what = f"text file '{files[0]}'" if len(files) == 1 else f"the {len(files)} text files"
        raise DataError(with_hint(f"{what} hold{'s' if len(files) == 1 else ''} no text",
                                  "pass files with text in them"))
    return Texts(names, data, empty)


def check_tokenizer(tokenizer: str, vocab_size: int | None) -> int:
    """Return the vocabulary the ids will lie in, or refuse options that do not fit.

    Raises:
        DataError: an unknown tokenizer, ``--vocab-size`` with ``byte`` or missing with
            ``bpe``, or a BPE vocabulary too small (below 257: the 256 byte tokens it starts
            from and a merge) or too large (2**24: ids travel as float32).
    """
    if tokenizer not in TOKENIZERS:
        raise DataError(with_hint(f"tokenizer {tokenizer!r} is unknown", "use byte or bpe"))
    if tokenizer == "byte":
        if vocab_size is not None:
            raise DataError(with_hint(
                f"--vocab-size {vocab_size} has no effect with --tokenizer byte (256 byte ids)",
                "drop --vocab-size, or learn a vocabulary with --tokenizer bpe"))
        return BYTE_VOCAB
    if vocab_size is None:
        raise DataError(with_hint("--tokenizer bpe needs --vocab-size",
                                  "e.g. --vocab-size 4096"))
    if vocab_size <= BYTE_VOCAB:
        raise DataError(with_hint(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE: it starts from the "
            f"{BYTE_VOCAB} byte tokens", f"use --vocab-size {BYTE_VOCAB + 1} or more (e.g. "
            "4096), or --tokenizer byte"))
    if vocab_size > MAX_VOCAB:
        raise DataError(with_hint(
            f"--vocab-size {vocab_size} is larger than {MAX_VOCAB} (2**24: token ids reach "
            "the model as float32, exact only below it)", f"use --vocab-size {MAX_VOCAB} or less"))
    return vocab_size


def train_bpe(texts: Texts, vocab_size: int) -> Any:
    """Learn a byte-level BPE of at most ``vocab_size`` tokens from ``texts`` (deterministic:
    the same text and size give the same ``tokenizer.json``)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError(with_hint("--tokenizer bpe needs the 'tokenizers' package",
                                  "pip install mpitrain[hf] (or pip install tokenizers)")) from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d.decode("utf-8") for d in texts.data], trainer,
                            length=len(texts.data))
    return tok


def encode(texts: Texts, tokenizer: str, vocab: int) -> tuple[
        list[np.ndarray], dict[str, Any], bytes | None]:
    """Each file's token ids, the tokenizer's manifest record and its ``tokenizer.json``."""
    dtype = token_dtype(vocab)
    if tokenizer == "byte":
        ids = [np.frombuffer(d, dtype=np.uint8) for d in texts.data]
        return ids, {"kind": "byte", "vocab_size": BYTE_VOCAB}, None
    tok = train_bpe(texts, vocab)
    blob = tok.to_str().encode()
    encoded = tok.encode_batch([d.decode("utf-8") for d in texts.data], add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encoded]
    record = {"kind": "bpe", "vocab_size": int(tok.get_vocab_size()), "file": TOKENIZER_FILE,
              "sha256": hashlib.sha256(blob).hexdigest()}
    return ids, record, blob


def token_windows(streams: list[np.ndarray], context: int, test_percent: int) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Arrays ``x`` (windows of ``context + 1`` ids: every train one, then every test one)
    and ``y`` (the file each window starts in), the splits, and each split's token count.

    Raises:
        DataError: a split shorter than one window.
    """
    starts = np.cumsum([0] + [len(s) for s in streams[:-1]])
    ids = np.concatenate(streams)
    cut = len(ids) * (100 - test_percent) // 100
    parts = {"train": (ids[:cut], 0), "test": (ids[cut:], cut)}
    xs, ys, counts = [], [], {}
    for split, (part, offset) in parts.items():
        win, labels = labelled_windows(part, starts, context, offset)
        if len(win) == 0:
            where = "first" if split == "train" else "last"
            share = 100 - test_percent if split == "train" else test_percent
            raise DataError(with_hint(
                f"the {split} split (the {where} {share}% of {len(ids)} tokens from "
                f"{len(streams)} file(s): {len(part)} tokens) is shorter than one window of "
                f"{context + 1} tokens", "give more text, a smaller --context, or another "
                "--test-percent"))
        xs.append(win)
        ys.append(labels)
        counts[split] = len(part)
    ntrain, ntest = len(xs[0]), len(xs[1])
    arrays = {"x": np.concatenate(xs), "y": np.concatenate(ys)}
    splits = {"train": np.arange(ntrain), "test": np.arange(ntrain, ntrain + ntest)}
    return arrays, splits, counts


def write_tokens(
    out: Path,
    inputs: Sequence[str],
    *,
    context: int,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    test_percent: int = 10,
    name: str | None = None,
    samples_per_shard: int = 4096,
    compression: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenize the text files ``inputs`` name into the dataset directory ``out`` (in this
    process); nothing is left at ``out`` unless it all succeeds."""
    vocab = check_tokenizer(tokenizer, vocab_size)
    files = collect_inputs(inputs)
    check_target(out, overwrite, [*files, *(Path(i) for i in inputs if Path(i).is_dir())])
    texts = read_texts(files)
    streams, record, blob = encode(texts, tokenizer, vocab)
    arrays, splits, counts = token_windows(streams, context, test_percent)
    params: dict[str, Any] = {
        "source": "text",
        "context": context,
        "test_percent": test_percent,
        "tokenizer": record,
        "num_tokens": counts,
        "text_sha256": hashlib.sha256(b"".join(texts.data)).hexdigest(),
        "text_files": texts.names,
        "skipped_empty": texts.skipped_empty,
    }
    return write_dataset(out, arrays, name=name or out.name, samples_per_shard=samples_per_shard,
                         compression=compression, splits=splits, params=params,
                         overwrite=overwrite, num_classes=len(texts.names), vocab=vocab,
                         extra={TOKENIZER_FILE: blob} if blob is not None else None)
