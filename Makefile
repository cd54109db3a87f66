# `make demo` and `make test` set everything up on first use (a venv in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/foldattn demo $(ARGS)

# -n auto: one pytest worker per CPU core (pytest-xdist), each with one torch thread; expensive
# read-only fixtures are built once for all workers (tests/conftest.py: shared_folder)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
