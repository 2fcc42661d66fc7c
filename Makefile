# The one interface to the project: install, run, test, lint, proto, bench.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/legato/v1/*.proto)

.PHONY: install run demo test lint format proto proto-check bench clean

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

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
