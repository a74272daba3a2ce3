# The front door. `make run` and `make test` do all set-up on a fresh Debian machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
MODEL := models/all-MiniLM-L6-v2/export.json
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite starts for real, and the benchmarks' load generator (wrk)
# and instruction counter (valgrind).
SYSTEM_PACKAGES := redis-server nginx prometheus prometheus-nginx-exporter prometheus-redis-exporter wrk valgrind
# Packaged services the stack and the tests start themselves, on their own ports.
PACKAGED_SERVICES := redis-server nginx prometheus prometheus-nginx-exporter prometheus-redis-exporter

.PHONY: help install run test lint format bench model system-deps clean stack stack-down stack-status loadtest oom

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# Rebuilt when a compiled module's source changes too (api/telemetry/*.pyx, *.pxd, and
# otlp.py, compiled as it is: its stale .so would shadow an edit).
$(STAMPS)/venv: pyproject.toml $(wildcard api/telemetry/*.pyx api/telemetry/*.pxd) api/telemetry/otlp.py
	@# A stock Debian has neither ensurepip (python3-venv) nor the C/C++ compiler and
	@# Python headers that llama-cpp-python and our Cython module build with: installed
	@# here only when missing.
	@if ! $(PYTHON) -m ensurepip --version >/dev/null 2>&1 || ! command -v g++ >/dev/null \
		|| ! $(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
			-y -qq --no-install-recommends python3-venv python3-dev build-essential; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: otherwise a dependency asking for torch pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/dev: $(STAMPS)/venv
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(MODEL): $(STAMPS)/venv
	$(BIN)/python -m api export-model

model: $(MODEL)  ## export the embedding model to ONNX (once)

install: $(STAMPS)/venv $(MODEL)  ## venv, packages and the ONNX model

run: install  ## serve the API on http://127.0.0.1:8000 (embedded Chroma under ./data)
	$(BIN)/python -m api serve

system-deps:  ## Debian packages the tests and benchmarks need
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# The packaged services are not what the stack or the tests use: they start their own,
	@# and the packaged Prometheus would hold :9090.
	@-$(SUDO) systemctl disable --now $(PACKAGED_SERVICES) >/dev/null 2>&1 || true

lint: $(STAMPS)/dev  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMPS)/dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install $(STAMPS)/dev system-deps lint  ## the whole suite, with real redis-server and chroma
	$(BIN)/pytest

stack: install system-deps  ## nginx :8080 over REPLICAS API replicas, redis, chroma, LLM, Prometheus :9090
	$(BIN)/python -m deployment.stack up

stack-down:  ## stop everything `make stack` started
	$(BIN)/python -m deployment.stack down

stack-status:  ## what `make stack` runs, and since when
	$(BIN)/python -m deployment.stack status

# make loadtest TARGET=http://127.0.0.1:8080 USERS=20 DURATION=60s SCENARIO=mixed SLO=slo.yaml
#   OPEN_ARGS="--arrival-rate 200" (open model) or OPEN_ARGS="--shape breakpoint" (and more:
#   python -m loadtest run --help)
TARGET ?= http://127.0.0.1:$(or $(NGINX_PORT),8080)
USERS ?= 20
DURATION ?= 60s
SCENARIO ?= mixed
PROCESSES ?= 1
loadtest: install  ## headless Locust run against TARGET (default: the stack); report in loadtest/reports/latest
	$(BIN)/python -m loadtest run --target $(TARGET) --users $(USERS) --duration $(DURATION) \
		--scenario $(SCENARIO) --processes $(PROCESSES) $(if $(SLO),--slo $(SLO)) $(OPEN_ARGS)

# make oom LIMIT=1536M WORKERS=2 (add OOM_ARGS=--until-kill to go past 85% to a real kill)
LIMIT ?= 1536M
WORKERS ?= 2
oom: install  ## ramp load on one memory-limited replica until OOM; report in loadtest/reports/oom-latest
	$(BIN)/python -m loadtest.oom --limit $(LIMIT) --workers $(WORKERS) $(OOM_ARGS)

bench: install $(STAMPS)/dev system-deps  ## embedding, ingest and /query throughput (docs/BENCHMARKS.md)
	$(BIN)/python -m benchmarks.service

clean:  ## remove the venv, the compiled telemetry, exported model and local data
	rm -rf $(VENV) $(STAMPS) models data .mypy_cache .ruff_cache .pytest_cache build \
		api/telemetry/*.c api/telemetry/*.so
