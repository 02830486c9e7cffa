# The README's commands. `make test` and `make demo` set the project up first, so each is one command
# on a fresh clone. CUDA machines: make setup TORCH_PIP_ARGS="--index-url <a CUDA wheel index for torch 2.13>"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/pte demo

bench: setup
	$(VENV)/bin/pte bench rollout --json outputs/bench/rollout.json
	$(VENV)/bin/pte bench train-memory --json outputs/bench/train_memory.json

clean:
	rm -rf $(VENV) build *.egg-info
