"""`python -m legato.server`: the same as `legato serve`."""

import sys

from legato.client.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
