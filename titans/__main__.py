"""`python -m titans ...`: the same command line as the `titans` script (see titans/cli.py)."""

from __future__ import annotations

import sys

from titans.cli import main

if __name__ == "__main__":
    sys.exit(main())
