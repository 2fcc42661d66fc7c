"""`python -m legato.server [OPTIONS]`: the same as `legato serve [OPTIONS]`."""

import sys

from legato.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
