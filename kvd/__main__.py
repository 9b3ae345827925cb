"""`python -m kvd` is the `kvd` command."""

from kvd.cli import main

raise SystemExit(main())
