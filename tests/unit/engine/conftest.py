"""Engine unit-test fixtures: the generic toy model/loader/task live in tests/distributed."""

import sys
from pathlib import Path

DIST_DIR = Path(__file__).resolve().parents[2] / "distributed"
if str(DIST_DIR) not in sys.path:
    sys.path.insert(0, str(DIST_DIR))
