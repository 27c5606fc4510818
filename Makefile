# Everything a new machine needs goes through these targets: each one creates
# the virtual environment (.venv) on first use and reuses it after.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job: train (or reuse) the digits teacher, sample, print FD / time tables.
demo: $(STAMP)
	$(PY) -m jdistill demo

# The default test suite (slow tests are excluded by the pytest config), on two workers, each
# taking whole test files (module fixtures are built once); the slowest tests are listed at the end.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
