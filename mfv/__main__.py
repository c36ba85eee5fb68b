from mfv.cli import main

raise SystemExit(main())
