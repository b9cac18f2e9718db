"""``python -m mpitrain trace summary PATH`` and ``trace plot PATH --out PNG`` (no MPI)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mpitrain.errors import DataError, MpitrainError
from mpitrain.runtime.files import write_atomic, write_failure
from mpitrain.runtime.tool_io import check_output_file


def build_parser() -> argparse.ArgumentParser:
    """The ``trace`` command's parser."""
    p = argparse.ArgumentParser(prog="python -m mpitrain trace",
                                description="analyse a timeline written with --timeline")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("summary", help="overlap, exposed communication, stragglers, buckets")
    s.add_argument("path", type=Path)
    s.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    s.add_argument("--peak-gbs", type=float, default=None,
                   help="link or shared-memory bandwidth (GB/s) to compare buckets against")
    s.add_argument("--max-rows", type=int, default=40,
                   help="step rows shown (the first and last half of them)")
    pl = sub.add_parser("plot", help="PNG of one step across ranks (needs matplotlib)")
    pl.add_argument("path", type=Path)
    pl.add_argument("--out", type=Path, required=True,
                    help="image file (its suffix picks the format; none: .png added), or an "
                    "existing directory (TRACE-stepN.png in it)")
    pl.add_argument("--step", type=int, default=None, help="default: the middle recorded step")
    return p


def main(argv: Sequence[str]) -> int:
    """Run ``trace``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    from mpitrain.timeline.summary import format_summary, load, problems, summarize

    try:
        if args.action == "summary" and args.json is not None:
            check_output_file(args.json, "--json", example="summary.json")
        if args.action == "plot":
            from mpitrain.timeline.plot import check_out, plot_step

            check_out(args.out)
        doc = load(args.path)
        if args.action == "summary":
            s = summarize(doc, path=str(args.path), peak_gbs=args.peak_gbs)
            print(format_summary(s, args.max_rows))
            found = problems(doc)
            if found:
                sys.stderr.write(f"mpitrain trace: warning: {len(found)} structural problem(s) "
                                 f"in the trace, first: {found[0]}\n")
            if args.json is not None:
                text = json.dumps(s.to_dict(), indent=1).encode()
                try:
                    write_atomic(args.json, text)
                except OSError as exc:
                    raise DataError(write_failure(args.json, exc, len(text))) from None
        else:
            step, written = plot_step(doc, args.out, args.step, trace=args.path)
            print(f"wrote {written} (step {step})")
    except MpitrainError as exc:
        sys.stderr.write(f"mpitrain trace: error: {exc}\n")
        return exc.exit_code
    return 0
