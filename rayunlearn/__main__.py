from rayunlearn.cli import main

raise SystemExit(main())
