# dsrecipes Makefile: the one place launch lines live. `make help` lists the targets.
# Setup:  make setup        (.venv with pinned deps: torch first, then everything from constraints.txt)
# Test:   make test         (whole CPU suite; SLURM tests run when `make setup-slurm` was done)
# Train:  make train        (tiny GPT-2, generated corpus, 2 CPU processes, ZeRO-2; prints output dir)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
# No hub on the default paths: an accidental download fails at once instead of hanging.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

ACCELERATE_CONFIG ?= configs/accelerate/deepspeed_cpu_2proc.yaml
RECIPE ?= configs/recipes/train_tiny_zero2.yaml
ARGS ?=
LAUNCH := $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG)

.PHONY: help setup test test-fast train lint check quality clean
help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-stamp  ## make .venv and install pinned deps (idempotent)
$(VENV)/.setup-stamp: constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

test: setup  ## run the whole CPU test suite
	$(BIN)/python -m pytest tests -q

test-fast: setup  ## unit tests only (no multi-process launches)
	$(BIN)/python -m pytest tests -q -m "not slow and not slurm"

train: setup  ## train the tiny default (2 CPU procs, ZeRO-2) and print where the outputs are
	$(LAUNCH) recipes/train_lm.py --config $(RECIPE) $(ARGS)

check: setup  ## lint every shipped config with dsrecipes check
	$(BIN)/dsrecipes check --all

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache
