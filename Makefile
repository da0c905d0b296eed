# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use, installing the versions pinned in constraints.txt. On a GPU machine,
# install the CUDA build of torch==2.13.0 into .venv first (see README), then run the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
RESOLVE := .venv-resolve

$(BIN)/ftgate: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

.PHONY: install demo test test-slow constraints
install: $(BIN)/ftgate

demo: $(BIN)/ftgate
	$(BIN)/ftgate demo

test: $(BIN)/ftgate
	$(BIN)/python -m pytest

test-slow: $(BIN)/ftgate
	$(BIN)/python -m pytest -m slow

# A fresh resolve of pyproject.toml's ranges (newest releases they admit), written to constraints.txt with
# its header kept; `make test` then reinstalls .venv from it and shows whether that set passes.
constraints:
	rm -rf $(RESOLVE)
	$(PYTHON) -m venv $(RESOLVE)
	$(RESOLVE)/bin/pip install --quiet torch==2.13.0
	$(RESOLVE)/bin/pip install --quiet ".[test,deploy]"
	{ grep '^#' $(CONSTRAINTS); $(RESOLVE)/bin/pip freeze --all --exclude pip --exclude ftgate | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(RESOLVE)
