from alexnet.cli import main

raise SystemExit(main())
