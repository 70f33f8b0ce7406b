from crossdiff.cli import main

raise SystemExit(main())
