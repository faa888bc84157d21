# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
comma := ,
UV_VERSION := 0.13.9
CONSTRAINTS := requirements/constraints.txt
# The main environment has the storage extras, the local S3/GCS servers and the openlineage provider;
# the Airflow 2.11 one has none of them, so its run also proves that https-only use works without the
# storage extras and that the operators report no lineage, and fail nothing, without openlineage.
EXTRAS := dev,emulator,amazon,google,storage-servers,redis,openlineage
INSTALLED := $(VENV)/.installed
# The oldest Airflow the provider supports gets a virtualenv and a test run of its own.
VENV_AIRFLOW2 ?= .venv-airflow2
CONSTRAINTS_AIRFLOW2 := requirements/constraints-airflow2.txt
INSTALLED_AIRFLOW2 := $(VENV_AIRFLOW2)/.installed
AIRFLOW2_TESTS := tests/unit tests/integration/test_hook.py tests/integration/test_trigger.py \
	tests/integration/test_operator.py tests/integration/test_provider_info.py \
	tests/integration/test_example_dags.py tests/integration/test_legacy_spellings.py \
	tests/integration/test_batch_operator.py tests/integration/test_object_storage.py

.PHONY: demo test lint typecheck pytest pytest-airflow2 system-packages bench lock emulator clean

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

$(INSTALLED_AIRFLOW2): pyproject.toml $(CONSTRAINTS_AIRFLOW2)
	$(PYTHON) -m venv $(VENV_AIRFLOW2)
	$(VENV_AIRFLOW2)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(VENV_AIRFLOW2)/bin/uv pip install --python $(VENV_AIRFLOW2)/bin/python --quiet \
		-c $(CONSTRAINTS_AIRFLOW2) -e ".[dev,emulator]" -r requirements/airflow2.in
	touch $@

## demo: run the example DAGs with `airflow dags test` against the local API emulator and a local S3
demo: $(INSTALLED)
	$(BIN)/python -m scripts.demo

## test: lint, type-check and run every test (on Airflow 3.3, then the Airflow 2.11 subset)
test: lint typecheck pytest pytest-airflow2

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALLED)
	$(BIN)/mypy

## system-packages: PostgreSQL and Redis for the production-shaped system tests (apt-get, as root)
system-packages:
	bash scripts/system_packages.sh

pytest: $(INSTALLED) system-packages
	$(BIN)/pytest

pytest-airflow2: $(INSTALLED_AIRFLOW2)
	$(VENV_AIRFLOW2)/bin/pytest $(AIRFLOW2_TESTS)

## bench: print the benchmark numbers (import cost, batch throughput against the limits, a production-shaped
## deployment with 100 mapped tasks and a 100-image batch; ~20 min)
bench: $(INSTALLED) system-packages
	$(BIN)/python -m benchmarks.import_time
	$(BIN)/python -m benchmarks.budget
	$(BIN)/python -m benchmarks.batch
	$(BIN)/python -m benchmarks.batch_deployment
	$(BIN)/python -m benchmarks.scale

## emulator: run the API emulator in the foreground on 127.0.0.1:8765
emulator: $(INSTALLED)
	$(BIN)/blip2-emulator

## lock: re-resolve the pinned development environment
lock: $(INSTALLED)
	$(BIN)/uv pip compile pyproject.toml $(foreach extra,$(subst $(comma), ,$(EXTRAS)),--extra $(extra)) \
		--universal --python-version 3.11 -o $(CONSTRAINTS) --quiet
	$(BIN)/uv pip compile pyproject.toml requirements/airflow2.in --extra dev --extra emulator --universal \
		--python-version 3.11 -o $(CONSTRAINTS_AIRFLOW2) --quiet

clean:
	rm -rf $(VENV) $(VENV_AIRFLOW2) .demo .mypy_cache .pytest_cache .ruff_cache
