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
# MLflow and Ray send usage reports by default; pcrl's commands never do.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

DEMO_SHARDS := $(CACHE)/demo/shards
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: help venv demo ui test lint format clean

help:
	@echo "make demo   - set up, fetch real sample CT/MRI volumes, shard them, pretrain briefly on CPU, log to MLflow"
	@echo "make ui     - the MLflow UI over a run's local store: make ui [RUN=runs/<name>] [PORT=5000]"
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

# The demo's shards are make's own cache: rebuilt (--overwrite) whenever the venv is, since a newer data_prep
# may write them differently and refuses to mix its output with an older shard set.
$(DEMO_SHARDS)/manifest.jsonl: $(VENV)/.installed
	$(BIN)/python -m data_prep.fetch --dest $(CACHE)/samples
	$(BIN)/python -m data_prep.shard --input $(CACHE)/samples/pyradiomics --exclude '*_label*' \
		--output $(DEMO_SHARDS) --split train=1.0 --workers 2 --overwrite

demo: $(DEMO_SHARDS)/manifest.jsonl
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 1 launch/pretrain.py --config configs/pretrain/tiny.yaml \
		data.shards=$(DEMO_SHARDS) run.output_dir=runs run.name=$(DEMO_RUN)

# The MLflow UI over one run folder's local store (default: the run that logged last). Its artifacts
# (config, reconstruction panels) are file:// URIs inside the run folder, which the server reads directly;
# --artifacts-destination keeps anything uploaded through the server there too. One worker and no job
# runners (MLflow 3 otherwise starts several that outlive the server). The printed address opens the
# experiment in MLflow's "Model training" view rather than its GenAI default.
RUN ?= $(patsubst %/mlflow.db,%,$(firstword $(shell ls -t runs/*/mlflow.db 2>/dev/null)))
PORT ?= 5000
ui:
	@test -n "$(RUN)" || { echo "make ui: no run folder with an MLflow store in runs/; run make demo, or pass RUN=runs/<name>" >&2; exit 2; }
	@test -f "$(RUN)/mlflow.db" || { echo "make ui: $(RUN) has no mlflow.db (a run with tracking.uri set logs to that server instead)" >&2; exit 2; }
	@exp=$$($(BIN)/python -c 'import sqlite3, sys; r = sqlite3.connect(sys.argv[1]).execute("select experiment_id from runs order by start_time desc limit 1").fetchone(); print(r[0] if r else 0)' "$(RUN)/mlflow.db"); \
		echo "MLflow UI for $(RUN): http://127.0.0.1:$(PORT)/#/experiments/$$exp/runs?workflowType=machine_learning  (Ctrl-C stops it)"
	@MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(BIN)/python -m mlflow server --host 127.0.0.1 --port $(PORT) \
		--workers 1 --backend-store-uri "sqlite:///$(abspath $(RUN))/mlflow.db" \
		--artifacts-destination "$(abspath $(RUN))/mlartifacts"

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
