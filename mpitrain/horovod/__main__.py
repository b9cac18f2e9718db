"""``python -m mpitrain.horovod install-alias [--target DIR] [--uninstall]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mpitrain.errors import MpitrainError
from mpitrain.horovod import alias


def main(argv: Sequence[str] | None = None) -> int:
    """Install or remove the ``horovod`` alias; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m mpitrain.horovod",
        description="Make `import horovod.torch as hvd` resolve to mpitrain.horovod.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser(
        "install-alias", help="write (or remove) the `horovod` alias package",
        description="Write a small `horovod` package (and its dist-info) that resolves to "
                    "mpitrain.horovod into site-packages; refuses if a real Horovod is there.")
    cmd.add_argument("--target", type=Path, default=None,
                     help=f"directory to write into (default: {alias.default_target()})")
    cmd.add_argument("--uninstall", action="store_true", help="remove the alias instead")
    args = parser.parse_args(argv)
    try:
        if args.uninstall:
            where = args.target or alias.default_target()
            if alias.uninstall(args.target):
                print(f"removed the horovod alias from {where}")
            else:
                print(f"no horovod alias in {where}: nothing to remove")
            return 0
        where = alias.install(args.target)
    except MpitrainError as exc:
        print(f"mpitrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"installed the horovod alias ({alias.VERSION}) in {where}: `import horovod.torch "
          "as hvd` now gives mpitrain.horovod")
    return 0


if __name__ == "__main__":
    sys.exit(main())
