from watchtower.cli import main

raise SystemExit(main())
