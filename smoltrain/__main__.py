from smoltrain.cli import main

raise SystemExit(main())
