# phitune — two commands on a fresh machine:  `make run` (the whole pipeline on the embedded default)
# and `make test`. Everything installs into .venv; torch is pinned to the local CPU wheel.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo-cpu.yaml

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The in-process runs of `make run` start a temporary Prefect server; 20 s (the default) is short on 2 busy cores.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: run test test-fast bench install install-test up down clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, with pip, from the local CPU wheel (pip's find-links): anything else fetches a CUDA
# build (gigabytes). Then uv installs the rest against that torch: ~20 s instead of pip's ~3.5 min,
# the same versions (constraints.txt pins what matters). --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set, every process would otherwise recompile Prefect, MLflow and torch
# from source, and Prefect's temporary server misses its start-up timeout.
UV := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 uv
	$(UV) -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(UV) -e '.[test]'
	@touch $@

install: $(VENV)/.installed  ## create .venv and install phitune

install-test: $(VENV)/.installed-test

run: install  ## validate, fine-tune, evaluate, register, deploy and smoke-test on the embedded default
	$(BIN)/phitune model pull-default
	$(BIN)/python flows/pipeline.py --config $(CONFIG)

test: install-test  ## install test extras and run the whole test suite (what CI runs)
	$(BIN)/pytest

test-fast: install-test  ## the inner loop: unit tests on tiny models, no real stack or embedded-model runs (minutes)
	$(BIN)/pytest -m "not slow and not integration"

bench: install  ## benchmarks against baselines, side by side (validation, training, serving)
	$(UV) -e '.[test,bench]'
	$(BIN)/phitune model pull-default
	$(BIN)/phitune bench

STACK ?= configs/stack.yaml

up: install  ## start the local stack for real: Prefect + MLflow servers and UIs, work pools, workers, deployments, automations
	$(BIN)/phitune stack up --config $(STACK) $(STACK_ARGS)

down:  ## stop exactly what `make up` started (pids in .phitune/stack/state.json)
	@if [ -x $(BIN)/python ]; then $(BIN)/phitune stack down --config $(STACK); else echo "no venv: nothing to stop"; fi

clean: down  # the state file lives under .phitune/: stop the stack before removing it

# Debian's chromium for tests/test_browser.py (Playwright drives it; no browser download). About a
# minute and 150 MB from the Debian mirror, once; without root or apt the browser test skips.
test: /usr/bin/chromium
/usr/bin/chromium:
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium: not installed (needs root and apt-get); the browser test will skip"; fi

clean:  ## remove local stores, runs and endpoints (not the venv or the model cache)
	-$(BIN)/phitune endpoint stop --all --config $(CONFIG)
	rm -rf .phitune mlruns mlflow.db .pytest_cache
