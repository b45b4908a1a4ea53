# MammoFlow — the two quick-start commands are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
UV ?= $(shell command -v uv 2>/dev/null)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0
export TF_CPP_MIN_LOG_LEVEL := 2
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ASYNC_LOGGING ?= false

.PHONY: help venv run plots study test lint typecheck unit integration bench ui serve stack-up stack-down stack-status clean-venv

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The venv is (re)built from the lock whenever pyproject.toml or uv.lock change.
$(VENV)/.installed: pyproject.toml uv.lock
	@if [ -z "$(UV)" ]; then python3 -m pip install --quiet --disable-pip-version-check uv==0.13.8; fi
	@UV=$$(command -v uv || echo "python3 -m uv"); $$UV sync --frozen --compile-bytecode --python python3.11
	@touch $@

venv: $(VENV)/.installed ## create .venv from uv.lock

run: venv ## the whole pipeline on the embedded sample data (dvc repro)
	$(VENV)/bin/dvc repro
	$(VENV)/bin/mammoflow report --no-write

plots: venv ## the backbones' curves overlaid, rendered offline: dvc plots show → dvc_plots/index.html
	$(VENV)/bin/dvc plots show

study: venv ## the real study of one dataset, paper's settings: make study DATASET=mias [WEIGHTS=none] [ARGS=...]
	@if [ -z "$(DATASET)" ]; then echo "usage: make study DATASET=mias [WEIGHTS=none] [ARGS='--backbone vgg16']"; exit 2; fi
	$(VENV)/bin/mammoflow study --dataset $(DATASET) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

test: venv lint typecheck ## lint, type-check and the whole test suite
	$(VENV)/bin/pytest -q

lint: venv ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv ## mypy
	$(VENV)/bin/mypy

unit: venv ## fast unit tests only
	$(VENV)/bin/pytest -q tests/unit -m "not slow"

bench: venv ## benchmarks (print JSON)
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_inference.py

ui: venv ## MLflow UI on the local store (http://127.0.0.1:5000)
	@echo "MLflow UI: http://127.0.0.1:$${MLFLOW_UI_PORT:-5000}/#/experiments?workflowType=machine_learning  (Ctrl-C stops)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $${MLFLOW_UI_PORT:-5000}

serve: venv ## local Prefect server + worker running the scheduled deployments (Ctrl-C stops)
	infra/serve.sh

stack-up: venv ## start the local team stack (PostgreSQL, SeaweedFS S3, MLflow, Prefect), no Docker
	$(PY) -m infra.local.stack up

stack-down: ## stop the local team stack (data kept in infra/local/state/)
	$(PY) -m infra.local.stack down

stack-status: ## health of the local team stack
	$(PY) -m infra.local.stack status

clean-venv: ## remove .venv
	rm -rf $(VENV)
