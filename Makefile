# Two commands do all set-up on a fresh machine (see README):
#   make run    - set up and run the main job (the simulator on the embedded default)
#   make test   - set up, lint (ruff, mypy, import-linter) and run the whole test suite
# `make lock` rewrites requirements.lock from the venv after a deliberate upgrade.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test lint setup lock bench mutants

run: setup
	$(BIN)/fedbus simulate examples/heart_failure.json --sites 3

# Two phases (tests/conftest.py): the tests that act on the whole broker node ("serial") beside
# those that reach no broker ("early"), one process each, the serial output shown when it ends;
# then everything else on two workers.
test: setup lint
	@mkdir -p build
	@echo "phase 1: serial tests (output in build/serial.log, shown when done) beside the early tests"
	$(BIN)/python -m pytest -q -m serial > build/serial.log 2>&1 & serial=$$!; \
	  $(BIN)/python -m pytest -q -m early; early=$$?; \
	  wait $$serial; rc=$$?; cat build/serial.log; test $$early -eq 0 && test $$rc -eq 0
	@echo "phase 2: the other tests on two workers"
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not serial and not early"

# The lines the code must hold (docs/testing.md "Lint"): style and real bugs, types on the
# product's lower layers, and imports that only go down the layers (pyproject [tool.importlinter]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Plant each curated bug (scripts/mutant_catalogue.py) and check its tests fail; docs/testing.md.
mutants: setup
	$(BIN)/python scripts/mutants.py --markdown build/mutants/table.md

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk; then fedbus with its test extras, every
# dependency at the version in requirements.lock (the versions the suite was last run with).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/pip check
	touch $@

# Refresh the lock: upgrade on purpose in the venv (e.g. `.venv/bin/pip install -U flwr`), run
# `make test`, then `make lock` and commit requirements.lock. torch is pinned above, fedbus is us.
lock: setup
	$(BIN)/pip check
	{ echo "# pip constraints for make setup: the versions the suite was last run with."; \
	  echo "# Refreshed by 'make lock' (pip freeze of .venv, without fedbus and torch); see README."; \
	  $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|fedbus)==' | LC_ALL=C sort -f; \
	} > requirements.lock
