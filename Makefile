# The one interface to the project: install, run, test, lint, proto, bench.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/legato/v1/*.proto)

.PHONY: install run demo test lint format proto proto-check bench bench-smoke bench-postgres chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/legato serve

# Plays a delegation between three throwaway agents on the daemon `make run` started.
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

# Measures legato and its ceilings in one run (< 10 min); writes BENCHMARKS.md and
# bench/latency.png. matplotlib draws the plot; it is a benchmark-only dependency.
bench: install
	$(BIN)/python -m pip install --quiet matplotlib
	$(BIN)/python -m bench

# The quick form CI runs (~1 min, small counts, no 1M database): the harness must
# work; a missed target is reported, not fatal. Writes under bench/results/smoke/.
bench-smoke: install
	$(BIN)/python -m pip install --quiet matplotlib || echo "bench-smoke: no matplotlib, no plot"
	$(BIN)/python -m bench --smoke

# The PostgreSQL backend against the SQLite one and a PostgreSQL-native queue's
# enqueue (pgqueuer, a benchmark-only dependency) on the server of
# LEGATO_BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test);
# writes its section of BENCHMARKS.md.
bench-postgres: install
	$(BIN)/python -m pip install --quiet pgqueuer
	$(BIN)/python -m bench.postgres

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
