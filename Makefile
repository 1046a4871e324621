# pcrl — the two commands of the quickstart are `make demo` and `make test`; each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CACHE ?= .cache
BIN := $(VENV)/bin
# CPU wheel of torch kept on the build machines; GPU clusters install their own CUDA build (docker/).
TORCH_SPEC ?= torch==2.13.0

export PCRL_CACHE := $(abspath $(CACHE))
# DeepSpeed JIT-compiles its CPU communication op once; keep it with the other caches.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(CACHE))/torch_extensions
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONUNBUFFERED := 1

DEMO_SHARDS := $(CACHE)/demo/shards
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: help venv demo test lint format clean

help:
	@echo "make demo   - set up, fetch real sample CT/MRI volumes, shard them, pretrain briefly on CPU, log to MLflow"
	@echo "make test   - lint and run the whole test suite on CPU"
	@echo "make format - format the code with ruff"

# The venv is rebuilt when pyproject.toml changes. torch goes first, pinned, so that no dependency can
# pull a multi-GB CUDA build onto a CPU machine.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]' "$(TORCH_SPEC)"
	@touch $@

venv: $(VENV)/.installed

$(DEMO_SHARDS)/manifest.jsonl: $(VENV)/.installed
	$(BIN)/python -m data_prep.fetch --dest $(CACHE)/samples
	$(BIN)/python -m data_prep.shard --input $(CACHE)/samples/pyradiomics --exclude '*_label*' \
		--output $(DEMO_SHARDS) --split train=1.0 --workers 2

demo: $(DEMO_SHARDS)/manifest.jsonl
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 1 launch/pretrain.py --config configs/pretrain/tiny.yaml \
		data.shards=$(DEMO_SHARDS) run.output_dir=runs run.name=$(DEMO_RUN)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
