"""``data_tools tokenize``: text files -> token windows + manifest (+ tokenizer.json), serial.

Round trips (the shards' windows, joined, are the text's tokens and decode to the text), the
manifest's fields, ``verify`` and ``--overwrite`` with the tokenizer file, the vocabulary a
GPT takes from the data, and bad input refused with one line and nothing lost.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from data_tools import report
from data_tools.cli import main
from mpitrain.config import TrainConfig
from mpitrain.errors import DataError
from mpitrain.train.corpus import model_vocab
from mpitrain.train.gpt import GPTConfig

# non-ASCII at the start, so a window boundary later on never splits a character
TEXTS = {
    "a.txt": "Héllo ✓ wörld.\n" + "".join(f"line {i}: the quick brown fox {i * i}\n"
                                         for i in range(60)),
    "sub/b.md": "# notes\n" + "tokens and windows, windows and tokens. " * 30,
    "empty.txt": "",
}


def _texts(tmp: Path) -> Path:
    for name, text in TEXTS.items():
        (tmp / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "in" / name).write_text(text, encoding="utf-8")
    return tmp / "in"


def _stream(out: Path, split: str) -> np.ndarray:
    """The split's windows joined back into one id stream (stride = context)."""
    m = json.loads((out / "manifest.json").read_text())
    x = np.concatenate([h5py.File(out / s["file"], "r")["x"][:] for s in m["shards"]])
    win = x[np.load(out / m["splits"][split]["file"])]
    return np.concatenate([win[0], *(w[1:] for w in win[1:])])


def _tokenize(*args: str) -> int:
    return main(["tokenize", *args], MPI.COMM_SELF)


def test_byte_and_bpe_round_trip_and_manifest(tmp_path: Path) -> None:
    src = _texts(tmp_path)
    # a directory, read recursively in path order: a.txt, empty.txt (left out), sub/b.md
    files = [src / "a.txt", src / "sub" / "b.md"]
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    raw = text.encode()
    byte, bpe = tmp_path / "byte", tmp_path / "bpe"
    assert _tokenize(str(src), "--out", str(byte), "--context", "16",
                     "--test-percent", "20", "--samples-per-shard", "50") == 0
    m = json.loads((byte / "manifest.json").read_text())
    p = m["params"]
    assert m["arrays"]["x"] == {"shape": [17], "dtype": "uint8"} and m["num_classes"] == 2
    assert p["vocab"] == 256 and p["tokenizer"] == {"kind": "byte", "vocab_size": 256}
    cut = len(raw) * 80 // 100
    assert p["num_tokens"] == {"train": cut, "test": len(raw) - cut}
    assert p["text_files"] == [str(f) for f in files] and p["skipped_empty"] == 1
    assert p["text_sha256"] == hashlib.sha256(raw).hexdigest() and len(m["shards"]) > 1
    train, test = _stream(byte, "train"), _stream(byte, "test")
    assert raw.startswith(train.tobytes()) and cut - len(train) < 16
    assert raw[cut:].startswith(test.tobytes()) and len(raw) - cut - len(test) < 16
    # y: the file a window starts in (the last test window's is the last file)
    with h5py.File(byte / m["shards"][-1]["file"], "r") as f:
        assert f["y"][0] in (0, 1) and f["y"][-1] == 1
    # bpe: learnt here, saved beside the shards, named with its size and hash; the shards'
    # ids are the tokenizer's ids of the text, and they decode back to it
    assert _tokenize(str(src / "a.txt"), str(src / "sub" / "*.md"), "--out", str(bpe),
                     "--context", "16", "--tokenizer", "bpe", "--vocab-size", "300") == 0
    from tokenizers import Tokenizer

    m = json.loads((bpe / "manifest.json").read_text())
    p = m["params"]
    blob = (bpe / "tokenizer.json").read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    assert p["vocab"] == 300 and m["arrays"]["x"]["dtype"] == "uint16"
    assert p["tokenizer"] == {"kind": "bpe", "vocab_size": 300, "file": "tokenizer.json",
                              "sha256": sha}
    assert p["extra_files"] == {"tokenizer.json": sha}
    tok = Tokenizer.from_file(str(bpe / "tokenizer.json"))
    ids = [i for f in files for i in tok.encode(f.read_text(encoding="utf-8")).ids]
    assert tok.decode(ids) == text
    cut = p["num_tokens"]["train"]
    train, test = _stream(bpe, "train"), _stream(bpe, "test")
    assert train.tolist() == ids[:len(train)] and test.tolist() == ids[cut:cut + len(test)]
    assert text.startswith(tok.decode(train.tolist())) and len(train) > 0.8 * cut
    assert report.verify(bpe) == []
    assert "tokenizer: bpe, 300 tokens, tokenizer.json" in report.inspect(bpe)
    # the same text and size learn the same tokenizer; --overwrite replaces a dataset that
    # holds one (named in the manifest, so not a foreign file)
    again = tmp_path / "again"
    assert _tokenize(str(src), "--out", str(again), "--context", "16", "--tokenizer", "bpe",
                     "--vocab-size", "300") == 0
    assert (again / "tokenizer.json").read_bytes() == blob
    assert _tokenize(str(src), "--out", str(again), "--context", "8", "--overwrite") == 0
    assert not (again / "tokenizer.json").exists()
    (bpe / "tokenizer.json").write_text("{}")
    assert any("tokenizer.json' fails its checksum" in line for line in report.verify(bpe))
    # the GPT embeds the data's vocabulary (256 without --data); a tensor split that does
    # not divide it is refused
    assert GPTConfig.from_train(TrainConfig(data=str(bpe))).vocab == 300
    assert GPTConfig.from_train(TrainConfig()).vocab == 256
    assert model_vocab(TrainConfig(data=str(byte), tensor_parallel=4)) == 256
    with pytest.raises(DataError, match="--tensor-parallel 8 does not divide the 300-token"):
        model_vocab(TrainConfig(data=str(bpe), tensor_parallel=8))
    # windows of another context are refused before any step, naming both contexts
    from mpitrain.train.run import main as train_main

    with pytest.raises(DataError, match=r"holds windows of 17 tokens; --model gpt with "
                       r"--context 8 needs token windows of 9. HINT: train with --context 16"):
        train_main(["--model", "gpt", "--data", str(byte), "--context", "8", "--hidden", "16",
                    "--heads", "2", "--layers", "1", "--no-progress"], MPI.COMM_SELF)


BAD = [  # the arguments ({src}: the texts, {tmp}: the test directory), the message
    (["{src}/missing.txt"], "text input '{src}/missing.txt' does not exist. HINT: pass UTF-8"),
    (["{src}/*.rst"], "text input '{src}/*.rst' matches no file. HINT"),
    (["{src}/empty.txt"], "text file '{src}/empty.txt' holds no text. HINT"),
    (["{src}/latin1.txt"], "text file '{src}/latin1.txt' is not UTF-8 (byte 0xe9 at offset 3)"),
    (["{src}", "--tokenizer", "bpe", "--vocab-size", "200"],
     "--vocab-size 200 is too small for a byte-level BPE"),
    (["{src}", "--tokenizer", "bpe"], "--tokenizer bpe needs --vocab-size. HINT"),
    (["{src}", "--vocab-size", "512"], "--vocab-size 512 has no effect with --tokenizer byte"),
    (["{src}/a.txt", "--context", "5000"],
     "the train split (the first 90% of 2003 tokens from 1 file(s): 1802 tokens) is shorter "
     "than one window of 5001 tokens. HINT"),
    (["{src}", "--out", "{src}/out"], "--out '{src}/out' lies inside the input '{src}'"),
    (["{src}/a.txt", "--out", "{tmp}/done"], "'{tmp}/done' already exists. HINT: pass "
     "--overwrite"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[
    "missing", "glob-matches-nothing", "empty", "not-utf8", "vocab-too-small",
    "bpe-without-vocab", "vocab-with-byte", "too-short", "out-inside-input", "out-exists"])
def test_bad_input_is_one_line_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    src = _texts(tmp_path)
    (src / "latin1.txt").write_bytes("café".encode("latin-1"))
    done = tmp_path / "done"
    assert _tokenize(str(src / "a.txt"), "--out", str(done), "--context", "8") == 0
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    capsys.readouterr()
    fill = {"src": str(src), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    if "--context" not in argv:
        argv += ["--context", "8"]
    assert _tokenize(*argv) != 0
    err = capsys.readouterr().err
    assert message.format(**fill) in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    # nothing half-written, nothing replaced
    assert not (tmp_path / "new").exists() and not (src / "out").exists()
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "in"]
