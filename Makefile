# Two commands do all set-up on a fresh machine (see README):
#   make run    - set up and run the main job (the simulator on the embedded default)
#   make test   - set up and run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test setup bench mutants

run: setup
	$(BIN)/fedbus simulate examples/heart_failure.json --sites 3

test: setup
	$(BIN)/python -m pytest -q

# Plant each curated bug (scripts/mutant_catalogue.py) and check its tests fail; docs/testing.md.
mutants: setup
	$(BIN)/python scripts/mutants.py --markdown build/mutants/table.md

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk; then fedbus with its test extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@
