# The two quick-start commands: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: venv demo test test-fast lint bench docs services clean

$(BIN)/failoverctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/failoverctl

services:  ## make sure the local RabbitMQ and MariaDB answer (starts them if not)
	bash .ci/services

demo: venv services  ## a test failover end to end on this machine
	$(BIN)/failoverctl demo

test: venv services  ## the whole suite, slow fault tests included
	$(BIN)/pytest -q

test-fast: venv services
	$(BIN)/pytest -q -m 'not slow'

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy statemachine schemas adapters consumers publishers failover

bench: venv services  ## the benchmarks (not part of the tests)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

docs: venv
	$(BIN)/failoverctl docs

clean:
	rm -rf $(VENV) demo-output .pytest_cache
