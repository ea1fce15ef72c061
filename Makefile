# Headwater developer commands. Everything installs itself on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup stack-up stack-down run test unit lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

stack-up: setup
	$(BIN)/headwater stack up

stack-down: setup
	$(BIN)/headwater stack down

# The local fleet on the real Kafka and Cassandra, with demo traffic; Ctrl-C stops it.
run: stack-up
	$(BIN)/headwater run --demo

# Every test: unit tests and integration tests against the real servers.
test: stack-up
	$(BIN)/pytest

# Unit tests only; no servers needed.
unit: setup
	$(BIN)/pytest -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
