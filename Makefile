# The two commands a newcomer needs: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint typecheck bench eval eval-external clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "SAGE needs Python 3.11 or newer: run make PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/sage serve

test: $(VENV)/.installed-dev lint typecheck
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python -m tests.bench

eval: $(VENV)/.installed
	$(BIN)/sage eval

# Retrieval on Debian's manual pages next to plain FTS5 BM25 (installs them with apt: needs root; not part of CI).
eval-external: $(VENV)/.installed-dev
	$(BIN)/python -m tests.external_eval

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
