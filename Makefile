# `make demo` and `make test` set up everything on a fresh machine: a virtual environment in .venv with the
# CPU build of PyTorch (TORCH=... to choose another), JAX, and this package in editable mode.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[torch,test,tfds,mteb,plot,serve]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/instructor-jax demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

# The quick tier for the inner loop: every subpackage, under 3 minutes on 2 cores (the README says the figure).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m fast tests

clean:
	rm -rf $(VENV)
