from selfsup.cli.app import main

raise SystemExit(main())
