from relaxlm.cli import main

raise SystemExit(main())
