# Two commands set up a fresh machine: `make demo` runs the main job on the embedded default,
# `make test` runs the tests. Both create (or reuse) .venv and install the CPU torch wheel first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: setup demo test test-all
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ernas-demo

test: setup
	$(PY) -m pytest -q -m "not slow" --durations=15

test-all: setup
	$(PY) -m pytest -q
