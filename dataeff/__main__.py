from dataeff.cli import main

raise SystemExit(main())
