# One task runner. Every target bootstraps the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-installed-stamp
CODE := src tests $(wildcard bench) scripts

.PHONY: all demo test chaos lint format bench bench-quick services browser web clean constraints

all: lint test

# constraints.txt pins the versions CI was last green with (refresh: make constraints,
# after `make bench` so that the pins of the bench extra stay).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^outboxer' > constraints.txt

demo: $(STAMP)
	$(BIN)/outboxer demo

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache

format: $(STAMP)
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

services:
	./scripts/ensure-services.sh

# Debian's chromium and chromium-driver for the console's browser tests (installed
# with apt-get when missing and run as root; otherwise those tests skip locally).
browser:
	./scripts/ensure-browser.sh

# The web console against the app named by OUTBOXER_APP (e.g. make web OUTBOXER_APP=myapp:outbox).
web: $(STAMP)
	$(BIN)/outboxer web

# Two pytest lanes at once (the fault scenarios and a few long files beside the rest;
# see scripts/run_tests.py); PYTEST_ARGS=... runs one plain pytest with them instead.
test: $(STAMP) lint services browser
	$(BIN)/python scripts/run_tests.py $(PYTEST_ARGS)

# The fault scenarios at full size (tests/faults; make test runs them at CI size);
# writes tests/faults/RESULTS.md.
chaos: $(STAMP) services
	OUTBOXER_FAULTS=full $(BIN)/python -m pytest tests/faults -m faults $(PYTEST_ARGS)

# The benchmark's extra contenders and plots (procrastinate, matplotlib) are not in
# `dev`: `make test` runs the benchmark at tiny size without them (they skip).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]' -c constraints.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) services
	$(BIN)/python -m bench
	$(BIN)/python -m bench.rabbitmq

bench-quick: $(BENCH_STAMP) services
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
