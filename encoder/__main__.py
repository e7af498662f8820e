"""python -m encoder ... (the same table as `ov2 ...`; torchrun launches `-m encoder train`)."""

from ov2.cli import main

raise SystemExit(main())
