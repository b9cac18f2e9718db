"""`python -m data_tools {convert,corpus,tokenize,split,inspect,verify}`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_tools import report, sources, split
from data_tools.tokenize import TOKENIZERS
from mpitrain.data import corpus
from mpitrain.data.manifest import check_name, load_manifest
from mpitrain.data.writer import Source
from mpitrain.errors import DataError, MpitrainError, with_hint
from mpitrain.runtime.collective import agree
from mpitrain.runtime.tool_io import check_output_place

if TYPE_CHECKING:
    from mpi4py import MPI


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (numpy's generators take no negative seeds)."""
    return _int_at_least(text, 0)


def shape(text: str) -> tuple[int, ...]:
    """argparse type: a per-sample shape such as ``784`` or ``28x28`` (positive sizes)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 784 or 28x28") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} has a size < 1")
    return dims


def mebibytes(text: str) -> int:
    """argparse type: a positive, finite number of MiB (``0.25``), returned as bytes (>= 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number such as 2 or 0.25") from None
    if not (math.isfinite(value) and value > 0 and int(value * 2**20) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size in MiB")
    return int(value * 2**20)


def percent(text: str) -> int:
    """argparse type: an integer percentage in 1..99."""
    value = _int_at_least(text, 1)
    if value > 99:
        raise argparse.ArgumentTypeError(f"{value} is not <= 99")
    return value


def fractions(text: str) -> list[float]:
    """argparse type: comma-separated finite fractions >= 0 with a positive sum."""
    try:
        values = [float(f) for f in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list such as 0.8,0.2") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need finite fractions >= 0, sum > 0")
    return values


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of all subcommands."""
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a source as HDF5 shards + manifest.json")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", type=Path, help=".npz file with arrays (see --x-key/--y-key)")
    src.add_argument("--npy", type=Path, nargs=2, metavar=("X.npy", "Y.npy"))
    src.add_argument("--csv", type=Path, help="CSV with a header (see --label)")
    src.add_argument("--images", type=Path, help="folder with one sub-folder per class")
    src.add_argument("--sklearn", choices=sources.SKLEARN_SETS)
    src.add_argument("--synthetic", type=positive_int, metavar="N", help="N seeded samples")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--name", default=None, help="shard name prefix (default: --out's name)")
    c.add_argument("--samples-per-shard", type=positive_int, default=50_000)
    c.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a dataset data_tools made at --out (nothing else)")
    c.add_argument("--x-key", default="x")
    c.add_argument("--y-key", default="y")
    c.add_argument("--label", default="label", help="CSV label column")
    c.add_argument("--resize", type=positive_int, default=None, help="resize images to N x N")
    c.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    c.add_argument("--features", type=shape, default=(784,),
                   help="synthetic sample shape, e.g. 784 or 28x28")
    c.add_argument("--classes", type=positive_int, default=None,
                   help="number of classes: labels must lie in [0, N) (synthetic: default 10)")
    c.add_argument("--seed", type=non_negative_int, default=0)
    c.add_argument("--vocab", type=positive_int, default=None,
                   help="x holds token ids: each must be an integer in [0, N) (--model gpt: 256)")
    k = sub.add_parser("corpus", help="write the byte-level Python-stdlib text corpus")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--context", type=positive_int, required=True,
                   help="bytes of context: each sample holds N+1 bytes")
    k.add_argument("--max-train-mb", type=mebibytes, default=corpus.MAX_TRAIN_BYTES,
                   dest="max_train_bytes", metavar="MIB", help="train bytes cap (default 2)")
    k.add_argument("--max-test-mb", type=mebibytes, default=corpus.MAX_TEST_BYTES,
                   dest="max_test_bytes", metavar="MIB", help="test bytes cap (default 0.25)")
    k.add_argument("--test-percent", type=percent, default=corpus.TEST_PERCENT,
                   help="share of the stdlib files in the test split (by file)")
    k.add_argument("--samples-per-shard", type=positive_int, default=corpus.SAMPLES_PER_SHARD)
    k.add_argument("--overwrite", action="store_true",
                   help="replace a dataset data_tools made at --out (nothing else)")
    add_tokenize(sub)
    s = sub.add_parser("split", help="add split index files to a dataset (no data copied)")
    s.add_argument("dir", type=Path)
    s.add_argument("--method", choices=split.METHODS, default="random")
    s.add_argument("--fractions", type=fractions, default=[0.8, 0.2])
    s.add_argument("--names", default="train,test")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--folds", type=positive_int, default=5)
    s.add_argument("--fold", type=non_negative_int, default=0)
    s.add_argument("--key", default="t", help="time-series: the array that orders samples")
    for name, text in (("inspect", "print a summary"), ("verify", "check every shard")):
        sub.add_parser(name, help=text).add_argument("dir", type=Path)
    return p


def add_tokenize(sub: Any) -> None:
    """The ``tokenize`` subcommand's options."""
    t = sub.add_parser("tokenize", help="write text files as token windows (+ tokenizer.json) "
                       "for --model gpt/llama/gpt2 --data")
    t.add_argument("inputs", nargs="+", metavar="TEXT",
                   help="UTF-8 text files, directories (every file under them) or quoted globs")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--context", type=positive_int, required=True,
                   help="tokens of context: each sample holds N+1 token ids")
    t.add_argument("--tokenizer", choices=TOKENIZERS, default="byte",
                   help="byte: UTF-8 bytes as ids 0..255; bpe: learn a byte-level BPE here")
    t.add_argument("--vocab-size", type=positive_int, default=None, metavar="N",
                   help="bpe: the vocabulary to learn (> 256), which the model embeds")
    t.add_argument("--test-percent", type=percent, default=corpus.TEST_PERCENT,
                   help="share of the tokens (the last ones) in the test split")
    t.add_argument("--name", default=None, help="shard name prefix (default: --out's name)")
    t.add_argument("--samples-per-shard", type=positive_int, default=corpus.SAMPLES_PER_SHARD)
    t.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a dataset data_tools made at --out (nothing else)")


def make_source(a: argparse.Namespace) -> Source:
    """Build the conversion source named by the flags."""
    if a.npz:
        return sources.from_npz(a.npz, a.x_key, a.y_key)
    if a.npy:
        return sources.from_npy(*a.npy)
    if a.csv:
        return sources.from_csv(a.csv, a.label)
    if a.images:
        return sources.from_images(a.images, a.resize, a.on_error)
    if a.sklearn:
        return sources.from_sklearn(a.sklearn)
    classes = 10 if a.classes is None else a.classes
    return sources.SyntheticSource(a.synthetic, a.features, classes, a.seed)


def inputs_of(a: argparse.Namespace) -> list[Path]:
    """The files and folders a convert command reads (``--out`` must stay clear of them)."""
    return [p for p in (a.npz, *(a.npy or ()), a.csv, a.images) if p is not None]


def split_names(text: str) -> list[str]:
    """The ``--names`` list: plain, distinct file-name parts."""
    names = text.split(",")
    for name in names:
        check_name(name, "--names: split name")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataError(with_hint(f"--names gives {dup!r} twice", "give each split its own name"))
    return names


def run_split(a: argparse.Namespace) -> None:
    """Compute and record the splits asked for."""
    names = split_names(a.names)
    n = load_manifest(a.dir).num_samples
    if a.method == "random":
        parts = split.random_split(n, a.fractions, a.seed)
    elif a.method == "stratified":
        parts = split.stratified_split(split.read_array(a.dir, "y"), a.fractions, a.seed)
    elif a.method == "kfold":
        parts = split.kfold_split(n, a.folds, a.fold, a.seed)
    else:
        parts = split.time_split(split.read_array(a.dir, a.key), a.fractions)
    if len(names) != len(parts):
        raise DataError(
            with_hint(f"--names gives {len(names)} names for {len(parts)} parts",
                      "give one name per fraction (kfold: two, e.g. --names train,test)")
        )
    split.add_splits(a.dir, dict(zip(names, parts, strict=True)))
    print(" ".join(f"{k}={len(v)}" for k, v in zip(names, parts, strict=True)))


def main(argv: Sequence[str] | None = None, comm: MPI.Intracomm | None = None) -> int:
    """Run one subcommand; ``convert``, ``corpus`` and ``tokenize`` run on every rank of
    ``comm`` (their errors agreed), the others on rank 0 only.

    Called with no ``comm`` (the ``data-tools`` console script), this is the entry point: it
    takes its arguments from ``sys.argv`` and runs under the shared MPI entry helper, which
    owns the duplicate of COMM_WORLD and the abort-on-exception hook.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if comm is None:
        build_parser().parse_args(args)  # --help and bad flags answer before MPI starts
        from mpitrain.runtime.abort import run_mpi

        return run_mpi(lambda world: main(args, world))
    a = build_parser().parse_args(args)
    try:
        if a.command == "convert":
            return run_convert(a, comm)
        if a.command == "corpus":
            return run_corpus(a, comm)
        if a.command == "tokenize":
            return run_tokenize(a, comm)
        if comm.rank != 0:
            return 0
        if a.command == "split":
            run_split(a)
        elif a.command == "inspect":
            print(report.inspect(a.dir))
        else:
            problems = report.verify(a.dir)
            for line in problems:
                print(f"BAD: {line}")
            print(f"{a.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
    except MpitrainError as exc:
        # convert's, corpus' and tokenize's errors are agreed (the same on every rank,
        # prefixed with the failing rank)
        if a.command not in AGREED or comm.rank == 0:
            prefix = "" if str(exc).startswith("rank ") else f"rank {comm.rank}: "
            sys.stderr.write(f"data_tools: error: {prefix}{exc}\n")
        return exc.exit_code
    return 0


#: the subcommands that run on every rank, their errors agreed
AGREED = ("convert", "corpus", "tokenize")


def check_out(comm: MPI.Intracomm, out: Path) -> None:
    """Collective: refuse an ``--out`` whose directory cannot be created or written (under a
    regular file, read-only) before any input is read; rank 0 decides for every rank."""
    agree(comm, lambda: check_output_place(out, "--out", hint="pick an --out in a writable "
                                           "directory") if comm.rank == 0 else None)


def run_convert(a: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: convert the source named by the flags; rank 0 prints the summary."""
    from data_tools.convert import convert

    out = Path(os.path.abspath(a.out))
    name = a.name if a.name is not None else out.name
    check_out(comm, out)
    source = agree(comm, lambda: make_source(a))
    params = {
        k: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
        for k, v in vars(a).items()
        if v is not None and k != "command"
    }
    convert(
        comm,
        source,
        out,
        name=name,
        samples_per_shard=a.samples_per_shard,
        compression=a.compression,
        overwrite=a.overwrite,
        params=params,
        inputs=inputs_of(a),
        num_classes=a.classes,
        vocab=a.vocab,
    )
    if comm.rank == 0:
        print(report.inspect(out))
    return 0


def run_corpus(a: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: rank 0 writes the stdlib corpus (a few MiB; the other ranks wait) and
    prints the summary; a failure is raised on every rank."""
    out = Path(os.path.abspath(a.out))
    check_out(comm, out)
    agree(
        comm,
        lambda: corpus.write_corpus(
            out,
            a.context,
            samples_per_shard=a.samples_per_shard,
            overwrite=a.overwrite,
            max_train_bytes=a.max_train_bytes,
            max_test_bytes=a.max_test_bytes,
            test_percent=a.test_percent,
        ) if comm.rank == 0 else None,
    )
    if comm.rank == 0:
        print(report.inspect(out))
    return 0


def run_tokenize(a: argparse.Namespace, comm: MPI.Intracomm) -> int:
    """Collective: rank 0 tokenizes the text into ``--out`` (the other ranks wait) and prints
    the summary; a failure is raised on every rank."""
    from data_tools.tokenize import write_tokens

    out = Path(os.path.abspath(a.out))
    check_out(comm, out)
    agree(
        comm,
        lambda: write_tokens(
            out,
            a.inputs,
            context=a.context,
            tokenizer=a.tokenizer,
            vocab_size=a.vocab_size,
            test_percent=a.test_percent,
            name=a.name,
            samples_per_shard=a.samples_per_shard,
            compression=a.compression,
            overwrite=a.overwrite,
        ) if comm.rank == 0 else None,
    )
    if comm.rank == 0:
        print(report.inspect(out))
    return 0
