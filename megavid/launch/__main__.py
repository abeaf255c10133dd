"""``python -m megavid.launch``."""

import sys

from megavid.launch.cli import main

sys.exit(main())
