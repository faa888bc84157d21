# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
CONSTRAINTS := requirements/constraints.txt
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench lock emulator clean

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c $(CONSTRAINTS) -e ".[dev,emulator]"
	touch $@

## demo: run the example DAG with `airflow dags test` against the local API emulator
demo: $(INSTALLED)
	$(BIN)/python -m scripts.demo

## test: lint, type-check and run every test
test: lint typecheck pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALLED)
	$(BIN)/mypy

pytest: $(INSTALLED)
	$(BIN)/pytest

## bench: print the benchmark numbers (import cost, batch throughput against the limits)
bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.import_time
	$(BIN)/python -m benchmarks.budget

## emulator: run the API emulator in the foreground on 127.0.0.1:8765
emulator: $(INSTALLED)
	$(BIN)/blip2-emulator

## lock: re-resolve the pinned development environment
lock: $(INSTALLED)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra emulator --universal --python-version 3.11 \
		-o $(CONSTRAINTS) --quiet

clean:
	rm -rf $(VENV) .demo .mypy_cache .pytest_cache .ruff_cache
