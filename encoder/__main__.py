from encoder.cli import main

raise SystemExit(main())
