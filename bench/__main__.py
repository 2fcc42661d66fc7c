"""`python -m bench` (`make bench`); `python -m bench --smoke` (`make bench-smoke`)."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
