# A newcomer's commands. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Python's default: compiled modules cached, so the hundreds of processes the tests start do
# not each compile the packages again (some shells set this to keep trees clean)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo cluster-demo test check audit lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

## demo: the whole district simulated, the service and its pages, embedded broker and store
demo: $(STAMP)
	$(BIN)/chargewatch demo

## test: lint, type-check, audit the dependencies, then every test (real mosquitto/influxd/victoria-metrics when installed)
test: check audit
	$(BIN)/python -m pytest

## check: ruff (lint + format) and mypy --strict on the packages
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

lint: check

## audit: known vulnerabilities of the installed dependencies (pip-audit); says so when it cannot reach its advisory source
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

## bench: benchmarks, printed as ratios to ceilings measured in the same run
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/chargewatch bench

clean:
	rm -rf $(VENV) .demo-data chargewatch-data .pytest_cache .mypy_cache .ruff_cache .hypothesis

## cluster-demo: PostgreSQL, mosquitto, two ingest workers, two API replicas, the simulated district
cluster-demo: $(STAMP)
	$(BIN)/python -m bench.clusterdemo
