"""`python -m data_tools {convert,split,inspect,verify}`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from data_tools import report, sources, split
from mpitrain.data.manifest import load_manifest
from mpitrain.data.writer import Source
from mpitrain.errors import DataError, MpitrainError

if TYPE_CHECKING:
    from mpi4py import MPI


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
    src.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic samples")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--name", default=None, help="shard name prefix (default: --out's name)")
    c.add_argument("--samples-per-shard", type=int, default=50_000)
    c.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    c.add_argument("--x-key", default="x")
    c.add_argument("--y-key", default="y")
    c.add_argument("--label", default="label", help="CSV label column")
    c.add_argument("--resize", type=int, default=None, help="resize images to N x N")
    c.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    c.add_argument("--features", default="784", help="synthetic sample shape, e.g. 784 or 28x28")
    c.add_argument("--classes", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("split", help="add split index files to a dataset (no data copied)")
    s.add_argument("dir", type=Path)
    s.add_argument("--method", choices=split.METHODS, default="random")
    s.add_argument("--fractions", default="0.8,0.2")
    s.add_argument("--names", default="train,test")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--fold", type=int, default=0)
    s.add_argument("--key", default="t", help="time-series: the array that orders samples")
    for name, text in (("inspect", "print a summary"), ("verify", "check every shard")):
        sub.add_parser(name, help=text).add_argument("dir", type=Path)
    return p


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
    shape = tuple(int(d) for d in a.features.lower().split("x"))
    return sources.SyntheticSource(a.synthetic, shape, a.classes, a.seed)


def run_split(a: argparse.Namespace) -> None:
    """Compute and record the splits asked for."""
    names = a.names.split(",")
    fractions = [float(f) for f in a.fractions.split(",")]
    n = load_manifest(a.dir).num_samples
    if a.method == "random":
        parts = split.random_split(n, fractions, a.seed)
    elif a.method == "stratified":
        parts = split.stratified_split(split.read_array(a.dir, "y"), fractions, a.seed)
    elif a.method == "kfold":
        parts = split.kfold_split(n, a.folds, a.fold, a.seed)
    else:
        parts = split.time_split(split.read_array(a.dir, a.key), fractions)
    if len(names) != len(parts):
        raise DataError(f"--names gives {len(names)} names for {len(parts)} parts")
    split.add_splits(a.dir, dict(zip(names, parts, strict=True)))
    print(" ".join(f"{k}={len(v)}" for k, v in zip(names, parts, strict=True)))


def main(argv: Sequence[str] | None, comm: MPI.Intracomm) -> int:
    """Run one subcommand; ``convert`` uses every rank of ``comm``, the others rank 0 only."""
    a = build_parser().parse_args(argv)
    try:
        if a.command == "convert":
            from data_tools.convert import convert

            source = make_source(a)
            out = convert(
                comm,
                source,
                a.out,
                name=a.name or a.out.name,
                samples_per_shard=a.samples_per_shard,
                compression=a.compression,
                overwrite=a.overwrite,
                params={k: str(v) for k, v in vars(a).items() if v is not None and k != "command"},
            )
            if comm.rank == 0:
                print(report.inspect(out))
            return 0
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
        sys.stderr.write(f"data_tools: error: rank {comm.rank}: {exc}\n")
        return 1
    return 0
