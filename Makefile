# model-audit — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is newer than pyproject.toml once `install` has run for its current content.
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow bench validate lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: pip takes these from this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,timm,huggingface]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with torch 2.14.1 and the project (editable, with the dev, timm and huggingface extras)

demo: $(STAMP) ## the main job on embedded defaults (synthetic data, local SQLite MLflow store)
	$(PY) -m audit.training.demo

# Tests start subprocesses (servers, DDP ranks) beside the main one: passive OpenMP
# waits keep idle worker threads from spinning on the 2 cores they share.
test: $(STAMP) ## the fast test suite (installs first when needed)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m "not slow and not gpu" -q

# TEST_SLOW_BUDGET_S=N time-boxes test-slow: the tests not started within N seconds are skipped
# (and listed as skipped), so that CI (.ci/run) fits the fast suite and a share of these in its limit.
TEST_SLOW_BUDGET_S ?=
test-slow: $(STAMP) ## the slow tests: model training, benchmark proof, servers (TEST_SLOW_BUDGET_S=N: time-boxed)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m "slow" -q $(if $(TEST_SLOW_BUDGET_S),--time-budget=$(TEST_SLOW_BUDGET_S))

bench: $(STAMP) ## speed and memory benchmarks, printed as ratios (installs the bench extra)
	$(PY) -m pip install -q -e '.[dev,timm,bench]'
	$(PY) -m audit.bench

VALIDATE_ARGS ?= --jobs 2
validate: $(STAMP) ## gate detection quality: 15 models (rho x seeds), confusion table (~17 min on 2 cores)
	$(PY) -m audit.training.validate $(VALIDATE_ARGS)

lint: $(STAMP) ## ruff
	$(PY) -m ruff format --check audit callbacks tests conf
	$(PY) -m ruff check audit callbacks tests

clean: ## remove the venv and generated files (runs in mlruns/, reports/ but for its README)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun mlflow.db mlruns
	[ ! -d reports ] || find reports -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
