"""`python -m mpitrain`: the entry point."""

from __future__ import annotations

import sys

from mpitrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
