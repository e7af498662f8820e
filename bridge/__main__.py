"""python -m bridge ... (same as `ov2 bridge ...`)."""

import sys

from bridge.cli import main

sys.exit(main())
