from mltrain.cli import main

raise SystemExit(main())
