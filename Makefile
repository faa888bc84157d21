# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
comma := ,
empty :=
space := $(empty) $(empty)
UV_VERSION := 0.13.9
CONSTRAINTS := requirements/constraints.txt
# Python writes the bytecode of what it imports into the virtualenvs, even where the environment asks it
# not to (PYTHONDONTWRITEBYTECODE): without it every Python process, each Airflow component and task
# among them, compiles Airflow's sources again (an import of airflow.sdk: 8.9 s instead of 3.9 s).
unexport PYTHONDONTWRITEBYTECODE
# What each virtualenv gets: the package's extras (what users install) and the dependency groups of
# pyproject.toml (development only). The main environment has the storage extras, the local S3/GCS
# servers and the openlineage provider; the Airflow 2.11 one has none of them, so its run also proves
# that https-only use works without the storage extras and that the operators report no lineage, and
# fail nothing, without openlineage.
EXTRAS := emulator amazon google redis openlineage
GROUPS := dev storage-servers release docs celery
INSTALLED := $(VENV)/.installed
RESULTS := benchmarks/results
# The oldest Airflow the provider supports gets a virtualenv and a test run of its own.
VENV_AIRFLOW2 ?= .venv-airflow2
CONSTRAINTS_AIRFLOW2 := requirements/constraints-airflow2.txt
INSTALLED_AIRFLOW2 := $(VENV_AIRFLOW2)/.installed
EXTRAS_AIRFLOW2 := emulator
GROUPS_AIRFLOW2 := dev
AIRFLOW2_TESTS := tests/unit tests/integration/test_hook.py tests/integration/test_trigger.py \
	tests/integration/test_operator.py tests/integration/test_provider_info.py \
	tests/integration/test_example_dags.py tests/integration/test_legacy_spellings.py \
	tests/integration/test_batch_operator.py tests/integration/test_object_storage.py \
	tests/system/test_connection_form_airflow2.py

.PHONY: demo test lint typecheck docs dist pytest pytest-airflow2 system-packages bench lock emulator screenshots clean

# `uv pip` arguments: ".[a,b]" for the package with its extras, --extra X for each extra, --group X for each group.
with_extras = ".[$(subst $(space),$(comma),$(strip $(1)))]"
extra_args = $(foreach extra,$(1),--extra $(extra))
group_args = $(foreach group,$(1),--group $(group))

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c $(CONSTRAINTS) -e $(call with_extras,$(EXTRAS)) \
		$(call group_args,$(GROUPS))
	touch $@

$(INSTALLED_AIRFLOW2): pyproject.toml $(CONSTRAINTS_AIRFLOW2)
	$(PYTHON) -m venv $(VENV_AIRFLOW2)
	$(VENV_AIRFLOW2)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(VENV_AIRFLOW2)/bin/uv pip install --python $(VENV_AIRFLOW2)/bin/python --quiet \
		-c $(CONSTRAINTS_AIRFLOW2) -e $(call with_extras,$(EXTRAS_AIRFLOW2)) $(call group_args,$(GROUPS_AIRFLOW2)) \
		-r requirements/airflow2.in
	touch $@

## demo: run the example DAGs with `airflow dags test` against the local API emulator and a local S3
demo: $(INSTALLED)
	$(BIN)/python -m scripts.demo

## test: lint, type-check, build the docs, build and check the distributions, run every test (on
## Airflow 3.3 and, beside it, the Airflow 2.11 subset)
# The checks before the tests run side by side (mypy is single-threaded), each one's output kept whole;
# so do the two suites: the Airflow 2.11 subset (its install included) fills the time the Airflow 3.3
# suite's system tests spend waiting on the API's limits.
test: $(INSTALLED)
	$(MAKE) --no-print-directory -j2 --output-sync=target lint typecheck docs dist
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest pytest-airflow2

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALLED)
	$(BIN)/mypy

## dist: build the sdist and the wheel into dist/ (the wheel from the sdist) and check them for PyPI
dist: $(INSTALLED)
	rm -rf dist
	$(BIN)/uv build --quiet --build-constraints $(CONSTRAINTS) --out-dir dist
	$(BIN)/twine check --strict dist/*

## docs: build the documentation site into site/; any warning fails the build
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## system-packages: PostgreSQL, Redis and Chromium for the system tests (apt-get, as root)
system-packages:
	bash scripts/system_packages.sh

# Three workers on Airflow 3.3: the production-shaped system tests on one and the other system
# tests on another, both started first and mostly waiting on the API's limits, the other modules by
# file on whichever is free (tests/conftest.py). The Airflow 2.11 subset has few system tests: two.
PYTEST_WORKERS := -n 3
PYTEST_WORKERS_AIRFLOW2 := -n 2

pytest: $(INSTALLED) system-packages
	$(BIN)/pytest $(PYTEST_WORKERS)

pytest-airflow2: $(INSTALLED_AIRFLOW2) system-packages
	$(VENV_AIRFLOW2)/bin/pytest $(PYTEST_WORKERS_AIRFLOW2) $(AIRFLOW2_TESTS)

## bench: print the benchmark numbers (import cost, batch throughput against the limits, a production-shaped
## deployment with 100 mapped tasks and a 100-image batch on LocalExecutor and on Celery workers, 1,000 triggers
## in one loop, the synchronous run offered and refused; ~60 min) and write them
## to benchmarks/results/, which the docs draw their plots from
bench: $(INSTALLED) system-packages
	$(BIN)/python -m benchmarks.import_time --json $(RESULTS)/import_time.json
	$(BIN)/python -m benchmarks.budget --json $(RESULTS)/budget.json
	$(BIN)/python -m benchmarks.batch --json $(RESULTS)/batch.json
	$(BIN)/python -m benchmarks.batch_deployment --json $(RESULTS)/batch_deployment.json
	$(BIN)/python -m benchmarks.scale --json $(RESULTS)/scale.json
	$(BIN)/python -m benchmarks.scale --redis --json $(RESULTS)/scale-redis.json
	$(BIN)/python -m benchmarks.scale --redis --celery-workers 2 --json $(RESULTS)/scale-celery.json
	$(BIN)/python -m benchmarks.sync_run --json $(RESULTS)/sync_run.json
	$(BIN)/python -m benchmarks.uploads --json $(RESULTS)/uploads.json
	$(BIN)/python -m benchmarks.cache --json $(RESULTS)/cache.json
	$(BIN)/python -m benchmarks.triggerer_load --json $(RESULTS)/triggerer_load.json

## emulator: run the API emulator in the foreground on 127.0.0.1:8765
emulator: $(INSTALLED)
	$(BIN)/blip2-emulator

## screenshots: redraw docs/img/connection-form*.png with the browser test of the connection form
screenshots: $(INSTALLED) system-packages
	BLIP2_SCREENSHOT_DIR=$(CURDIR)/docs/img $(BIN)/pytest tests/system/test_connection_form.py \
		-k test_add_a_blip2_connection

## lock: re-resolve the pinned development environment
lock: $(INSTALLED)
	$(BIN)/uv pip compile pyproject.toml $(call extra_args,$(EXTRAS)) $(call group_args,$(GROUPS)) \
		--universal --python-version 3.11 -o $(CONSTRAINTS) --quiet
	$(BIN)/uv pip compile pyproject.toml requirements/airflow2.in $(call extra_args,$(EXTRAS_AIRFLOW2)) \
		$(call group_args,$(GROUPS_AIRFLOW2)) --universal --python-version 3.11 -o $(CONSTRAINTS_AIRFLOW2) --quiet

clean:
	rm -rf $(VENV) $(VENV_AIRFLOW2) dist .demo .mypy_cache .pytest_cache .ruff_cache site
