"""legato's benchmark harness: the daemon and its ceilings, measured in the same run.

`make bench` (`python -m bench`) runs every section and writes BENCHMARKS.md and
bench/latency.png; `make bench-smoke` (`python -m bench --smoke`) is the quick
form CI runs so the harness never rots. Modules, one per concern:

- `profiles`: how much of everything a run does (full or smoke).
- `payloads`: the requests every section sends, one shape for legato and ceilings.
- `procs`: the processes of a run (daemons, ceilings) and what /proc says of them.
- `ceilings`: the bare grpc.aio echo and fan-out servers legato is compared to.
- `loadgen`: load-generator worker processes, driven over a pipe.
- `dbgen`: the 10k / 1M task databases, generated directly and cached.
- `sections`: what is measured, section by section.
- `ladder`: the CreateTask ladder, from the bare echo to legato one step at a
  time (`make bench-ladder` runs it alone); `naive`: its middle servers;
  `profiler`: py-spy recordings of a server under load; `components`: the
  pieces of legato's create timed alone; `ladder_report`: its tables and plot.
- `ab`: legato against modified copies of its server on the unary calls of the
  targets, in the same rounds (`make bench-ab VARIANTS="name=DIR ..."`).
- `ids`: random against time-ordered task ids and idempotency keys, at the
  SQLite writer, on a history.
- `stats`, `report`: medians and ratios; the console table, BENCHMARKS.md, the plots.
"""
