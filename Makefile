# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. On a GPU machine, install the CUDA build of
# torch==2.13.0 into .venv first (see README), then run the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ftgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

.PHONY: install demo test test-slow
install: $(BIN)/ftgate

demo: $(BIN)/ftgate
	$(BIN)/ftgate demo

test: $(BIN)/ftgate
	$(BIN)/python -m pytest

test-slow: $(BIN)/ftgate
	$(BIN)/python -m pytest -m slow
