#!/usr/bin/env python
"""Standalone form of `megavid export-checkpoint` (same arguments), for use without the console script."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export-checkpoint", *sys.argv[1:]]))
