# `make demo` and `make test` set everything up on first use (a venv in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow lint typecheck docs wheel-check ci
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
# `make test` skips the tests marked slow (multi-process end-to-end: launchers, kill-and-resume, DDP variants,
# runtime timing); `make test-slow` runs only those; CI runs both (docs/decisions.md, "What CI runs")
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m slow $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs

# mypy on src/foldattn, settings in pyproject.toml [tool.mypy] (docs/decisions.md, "Type checking")
typecheck: $(STAMP)
	$(BIN)/mypy

# the API reference site (mkdocs.yml: docs/*.md and the docstrings) into site/; a warning fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# build the sdist and wheel, install the wheel into a fresh venv outside the tree, run the demo there (.ci/wheel)
wheel-check: $(STAMP)
	.ci/wheel $(BIN)/python

# everything CI runs, each step timed (.ci/run)
ci:
	.ci/run
