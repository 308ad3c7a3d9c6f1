# One-command setup: every target that runs Python depends on the venv stamp, so a fresh clone
# installs the pinned requirements on first use and never again until requirements.txt changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
STATE ?= .state

# PoCL reports *no device* when it cannot write its kernel cache. Keep the cache outside the clone
# so that CI runs on the same machine reuse compiled kernels (the first build is slow).
export POCL_CACHE_DIR ?= $(HOME)/.cache/top-tagger/pocl
export XDG_CACHE_HOME ?= $(HOME)/.cache
export MPLBACKEND ?= Agg

.PHONY: help venv test lint demo bench-data lock clean

# Container images (build and push when a container engine exists): make images, make push-images
include manifests/images.mk

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

venv: $(STAMP)  ## create .venv and install the pinned requirements

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

test: $(STAMP)  ## lint, then the whole test suite
	@mkdir -p $(POCL_CACHE_DIR)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

demo: $(STAMP)  ## generate a small Pythia8 sample and summarise it
	@mkdir -p $(STATE)
	$(PY) -m components.generate --signal 250 --background 250 --seed 1 --out $(STATE)/demo_jets.h5
	$(PY) -m components.summary $(STATE)/demo_jets.h5 --plot $(STATE)/demo_jets_mass.png

bench-data: $(STAMP)  ## generation and reading throughput (docs/benchmarks.md)
	$(PY) -m components.bench --markdown docs/benchmarks/data.md

lock:  ## re-resolve requirements.in into requirements.txt
	rm -rf /tmp/top-tagger-lock && $(PYTHON) -m venv /tmp/top-tagger-lock
	/tmp/top-tagger-lock/bin/pip install --quiet -r requirements.in
	{ head -2 requirements.txt; /tmp/top-tagger-lock/bin/pip freeze; } > requirements.txt.new && mv requirements.txt.new requirements.txt

clean:  ## remove local state (keeps .venv)
	rm -rf $(STATE) .pytest_cache .ruff_cache
