# Two commands for a new user: `make demo` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch a machine without a GPU gets. On this kind of machine the pinned CPU wheel lies on local
# disk; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the small CPU build.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.lowband-installed

.PHONY: install demo test lint format clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "make: found torch in $(PYTHON); the virtual environment will keep it"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "make: GPU found, installing the default (CUDA) torch"; \
	    $(PY) -m pip install -q "torch>=2.11"; \
	  else \
	    echo "make: no GPU, installing the CPU torch wheel ($(TORCH_CPU))"; \
	    $(PY) -m pip install -q "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	  fi; \
	fi
	$(PY) -m pip install -q -e '.[test,elastic,hf,serve,decentral,flower]'
	@# byzfl is the reference the robust aggregators are tested against. Its own requirements
	@# would replace the CPU torch with a CUDA build and add torchvision; the tests import only
	@# its aggregators and attacks, which need numpy and torch alone.
	$(PY) -m pip install -q --no-deps byzfl==0.0.11
	@touch $(STAMP)

demo: install
	$(VENV)/bin/lowband demo

test: install
	$(PY) -m pytest -q -x --durations=15

lint: install
	$(VENV)/bin/ruff check lowband tests benchmarks examples
	$(VENV)/bin/ruff format --check lowband tests benchmarks examples

format: install
	$(VENV)/bin/ruff format lowband tests benchmarks examples
	$(VENV)/bin/ruff check --fix lowband tests benchmarks examples

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
