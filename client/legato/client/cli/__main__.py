"""`python -m legato.client.cli`: the `legato` command."""

from legato.client.cli import main

raise SystemExit(main())
