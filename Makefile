# The one interface to the project: install, run, test, lint, proto, bench.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/legato/v1/*.proto)
# The TypeScript client; npm ci writes node_modules/.package-lock.json.
TS      := clients/typescript
TS_DEPS := $(TS)/node_modules/.package-lock.json

.PHONY: install run demo test lint format proto proto-check sync sync-check bench bench-smoke bench-ladder bench-ab bench-postgres bench-mcp \
	chaos clean test-ts proto-ts proto-check-ts

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/legato serve

# Plays a delegation between three throwaway agents on your daemon (started if none runs).
demo: install
	$(BIN)/legato demo

test: install
	$(BIN)/python -m pytest -q

# The long form of the reliability suite (its short form runs in `make test`):
# kill -9 loops, lease chaos, 10,000 abandoned streams, fuzzing. ~10 min; see RELIABILITY.md.
chaos: install
	LEGATO_CHAOS=long $(BIN)/python -m pytest -q tests/reliability

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Generated code goes where protoc puts it, beside the .proto files; imports come
# out right with no fix-up step.
define GENERATE
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=$(1) --grpc_python_out=$(1) \
		--mypy_out=$(1) --mypy_grpc_out=$(1) $(PROTOS)
endef

proto: install
	$(call GENERATE,proto)

proto-check: install
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(call GENERATE,$$tmp) && \
	for f in $$(cd $$tmp && find . -type f | sort); do \
		cmp -s "$$tmp/$$f" "proto/$$f" || { echo "proto-check: proto/$$f is out of date; run 'make proto'"; exit 1; }; \
	done && \
	for f in $$(cd proto && find . -name __pycache__ -prune -o -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -print | sort); do \
		test -e "$$tmp/$$f" || { echo "proto-check: proto/$$f has no .proto source; delete it"; exit 1; }; \
	done && echo "proto-check: generated code matches proto/"

# The blocking client (_sync.py) is generated from the asyncio one (_async.py),
# as httpcore does with unasync; never edit _sync.py by hand.
sync: install
	$(BIN)/python scripts/unasync.py

sync-check: install
	$(BIN)/python scripts/unasync.py --check

# The TypeScript client (clients/typescript) needs Node.js 20 or newer. Under CI=true
# a missing Node fails the run; elsewhere its targets say how to get it and stop there.
NEED_NODE = if ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null; then \
		if [ "$${CI:-}" = true ]; then echo "$@: Node.js 20 or newer is needed and was not found (CI=true)"; exit 1; fi; \
		echo "$@: skipped: needs Node.js 20 or newer with npm; install it (Debian: apt-get install nodejs npm; or https://nodejs.org/en/download) and run 'make $@' again"; \
		exit 0; \
	fi

$(TS_DEPS): $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund

# Builds the client, then runs its tests against real daemons (`legato serve` from .venv).
test-ts: install
	@$(NEED_NODE); \
	$(MAKE) -s --no-print-directory $(TS_DEPS) && cd $(TS) && npm test

# ts-proto through the protoc that grpcio-tools ships; the output is committed.
TS_PROTO_OPT := outputServices=grpc-js,esModuleInterop=true,env=node,importSuffix=.js,outputJsonMethods=false
define GENERATE_TS
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--plugin=protoc-gen-ts_proto=$(TS)/node_modules/.bin/protoc-gen-ts_proto \
		--ts_proto_out=$(1) --ts_proto_opt=$(TS_PROTO_OPT) $(PROTOS)
endef

proto-ts: install
	@$(NEED_NODE); \
	$(MAKE) -s --no-print-directory $(TS_DEPS) && \
	rm -rf $(TS)/src/gen && mkdir -p $(TS)/src/gen && \
	$(call GENERATE_TS,$(TS)/src/gen)

proto-check-ts: install
	@$(NEED_NODE); \
	$(MAKE) -s --no-print-directory $(TS_DEPS) && \
	tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	{ $(call GENERATE_TS,$$tmp); } || exit 1; \
	if ! diff -r $$tmp $(TS)/src/gen >/dev/null; then \
		diff -rq $$tmp $(TS)/src/gen | sed "s|$$tmp|(generated)|"; \
		echo "proto-check-ts: $(TS)/src/gen is out of date; run 'make proto-ts'"; exit 1; \
	fi; \
	echo "proto-check-ts: generated code matches $(TS)/src/gen"

# Benchmark-only tools: matplotlib draws the plots, aiosqlite runs the issue's naive
# server in the ladder, py-spy profiles the ladder's servers.
BENCH_TOOLS := matplotlib aiosqlite py-spy

# Measures legato and its ceilings in one run (< 10 min), the CreateTask ladder
# included; writes BENCHMARKS.md, bench/latency.png and bench/ladder.png.
bench: install
	$(BIN)/python -m pip install --quiet $(BENCH_TOOLS)
	$(BIN)/python -m bench

# The quick form CI runs (~1 min, small counts, no 1M database): the harness must
# work; a missed target is reported, not fatal. Writes under bench/results/smoke/.
bench-smoke: install
	$(BIN)/python -m pip install --quiet $(BENCH_TOOLS) || echo "bench-smoke: no plots, no profiles"
	$(BIN)/python -m bench --smoke

# The CreateTask ladder alone (~4 min): bare echo, + legato's interceptors, + a naive
# commit per call, + legato's schema, legato; py-spy profiles of the last two. Writes
# bench/results/ladder/. VARIANTS="name=DIR ..." also measures `legato serve` run
# from a modified copy of the server (DIR holding legato/server/).
bench-ladder: install
	$(BIN)/python -m pip install --quiet $(BENCH_TOOLS)
	$(BIN)/python -m bench --section ladder --out bench/results/ladder \
		$(foreach variant,$(VARIANTS),--variant $(variant))

# legato against modified copies of its server (VARIANTS="name=DIR ...", each DIR
# holding legato/server/): CreateTask, GetTask and ClaimTask, in the same rounds.
bench-ab: install
	$(BIN)/python -m bench.ab $(VARIANTS)

# The PostgreSQL backend against the SQLite one and a PostgreSQL-native queue's
# enqueue (pgqueuer, a benchmark-only dependency) on the server of
# LEGATO_BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test);
# writes its section of BENCHMARKS.md.
bench-postgres: install
	$(BIN)/python -m pip install --quiet pgqueuer
	$(BIN)/python -m bench.postgres

# `legato mcp` from spawn to its answer to initialize, against a bare stdio server. ~30 s.
bench-mcp: install
	$(BIN)/python -m bench.mcp_start

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
