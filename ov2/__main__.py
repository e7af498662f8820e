from ov2.cli import main

raise SystemExit(main())
